"""The training guide's advice and signs of problems (docs/training-guide.md): dataset plan,
training diagnostics, summaries."""
