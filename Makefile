# The two commands of README.md. Each sets up .venv first (scripts/bootstrap.sh) if needed.
.PHONY: quickstart test lint setup

setup:
	@bash scripts/bootstrap.sh

quickstart: setup
	.venv/bin/oecl quickstart

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
