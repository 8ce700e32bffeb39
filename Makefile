# The two set-up commands of the README. Each installs what is missing first.
.PHONY: serve test lint

serve:
	bash docker/install.sh
	liveavatar serve

test:
	bash docker/install.sh --dev
	$(MAKE) lint
	python3 -m pytest -q

lint:
	ruff check .
	ruff format --check .
	mypy
