"""The loss plot of a run (loss.png, TrainLoRA's IMAGE output), drawn with Pillow alone: ComfyUI
ships no matplotlib, and a plot library for one line chart is not worth a dependency."""
from PIL import Image, ImageDraw, ImageFont

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def loss_plot(curves, width=640, height=360, title="loss"):
    """curves: {label: [(step, loss), ...]}, or a run's metrics lines: their training loss, and
    their validation loss when it was measured (a legend then names both). Returns a PIL image."""
    if isinstance(curves, list):
        curves = {label: [(m["step"], m[key]) for m in curves if key in m]
                  for label, key in (("training loss", "loss"), ("validation loss", "validation_loss"))}
        curves = {label: curve for label, curve in curves.items() if curve} or {"loss": []}
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 60, width - 16, 28, height - 36
    draw.text((left, 6), title, fill="black", font=font)
    points = [p for curve in curves.values() for p in curve]
    if not points:
        draw.text((left, height // 2), "no metrics logged yet", fill="gray", font=font)
        return image
    steps = [s for s, _ in points]
    losses = [v for _, v in points if v == v and abs(v) != float("inf")]
    low, high = (min(losses), max(losses)) if losses else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    first, last = min(steps), max(steps)
    span = max(last - first, 1)

    def xy(step, value):
        return (left + (right - left) * (step - first) / span,
                bottom - (bottom - top) * (value - low) / (high - low))

    draw.rectangle([left, top, right, bottom], outline="#888888")
    for fraction in (0.0, 0.5, 1.0):
        value = low + (high - low) * fraction
        y = bottom - (bottom - top) * fraction
        draw.text((4, y - 6), f"{value:.4g}", fill="black", font=font)
    draw.text((left, bottom + 6), str(first), fill="black", font=font)
    draw.text((right - 40, bottom + 6), str(last), fill="black", font=font)
    draw.text(((left + right) // 2 - 12, bottom + 18), "step", fill="black", font=font)
    for index, (label, curve) in enumerate(curves.items()):
        color = COLORS[index % len(COLORS)]
        line = [xy(s, v) for s, v in curve if v == v and abs(v) != float("inf")]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        elif line:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        if len(curves) > 1:  # the legend: a stroke of the curve's colour, then its label
            y = top + 10 + 12 * index
            draw.line([(right - 170, y), (right - 155, y)], fill=color, width=2)
            draw.text((right - 150, y - 6), str(label)[:24], fill=color, font=font)
    return image
