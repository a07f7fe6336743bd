"""GUIDE.md's advice and its signs of problems: dataset plan, training diagnostics, summaries."""
