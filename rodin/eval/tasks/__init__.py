"""Local lm-evaluation-harness tasks (YAML + items) that run offline; see littre_cloze.py."""
