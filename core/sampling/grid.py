"""Labelled image grids: rows are prompts, columns are LoRA strengths (or steps). Drawn with
Pillow, which ComfyUI already ships (torchvision's make_grid has no labels)."""
import textwrap

from PIL import Image, ImageDraw, ImageFont


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def make_grid(rows, row_labels, column_labels, title=None):
    """rows: list of lists of PIL images (all the same size). Returns one RGB image with the
    column labels on top and each row's label on its left."""
    cell_width, cell_height = rows[0][0].size
    font_size = max(10, min(24, cell_width // 10))
    font = _font(font_size)
    label_width = max(120, cell_width)
    header = font_size * 2 + (font_size * 2 if title else 0)
    width = label_width + cell_width * len(column_labels)
    height = header + cell_height * len(rows)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for column, label in enumerate(column_labels):
        draw.text((label_width + column * cell_width + 4, header - font_size * 2 + 2), str(label),
                  fill="black", font=font)
    chars_per_line = max(8, label_width // max(6, font_size // 2 + 1))
    for row, (images, label) in enumerate(zip(rows, row_labels)):
        top = header + row * cell_height
        lines = textwrap.wrap(str(label), chars_per_line)[: max(1, cell_height // (font_size + 2))]
        for line_number, line in enumerate(lines):
            draw.text((4, top + 2 + line_number * (font_size + 2)), line, fill="black", font=font)
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell_width, cell_height)),
                       (label_width + column * cell_width, top))
    return grid
