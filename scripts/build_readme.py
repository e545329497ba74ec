"""Fold the sections in docs/*.md into README.md between its SECTIONS markers (image paths fixed).

The docs are the source: edit them, then run `python scripts/build_readme.py`."""
import re
from pathlib import Path

root = Path(__file__).resolve().parents[1]
order = ["eval", "wandb", "sweeps", "speed", "reliability", "inference", "methods", "dashboard"]
parts = []
for name in order:
    text = (root / "docs" / f"{name}.md").read_text().strip()
    text = text.replace("](img/", "](docs/img/")
    lines = text.splitlines()
    # the first line is the section's `## ` heading; deeper `## ` headings become `### `
    out = [lines[0]] + [("#" + l if l.startswith("## ") else l) for l in lines[1:]]
    parts.append("\n".join(out))
readme = (root / "README.md").read_text()
start, end = "<!-- SECTIONS -->", "<!-- /SECTIONS -->"
body = start + "\n\n" + "\n\n".join(parts) + "\n\n" + end
if start in readme:
    readme = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda m: body, readme, flags=re.S)
else:
    readme = readme.replace("## Development", body + "\n\n## Development")
(root / "README.md").write_text(readme)
print("README:", len(readme.splitlines()), "lines")
