"""HTML reports a person reads: `html` (page parts, charts, overlays), `audit`, `drift`.
Templates (Jinja2) live in `templates/`."""
