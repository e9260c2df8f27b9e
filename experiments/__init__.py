"""Studies and data builders of ranprm (each a package: `python -m experiments.<name>`)."""
