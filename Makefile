# The two commands of the README: `make demo` and `make test`.
.PHONY: demo test bench setup clean

setup:
	@SNAPTREE_SETUP_SERVERS=1 SNAPTREE_SETUP_GUEST=1 scripts/setup.sh

demo:
	@SNAPTREE_SETUP_GUEST=1 scripts/setup.sh
	@.venv/bin/python scripts/demo.py

test: setup
	@scripts/services.sh
	.venv/bin/pytest

bench: setup
	.venv/bin/python benchmarks/run_all.py

clean:
	rm -rf .venv demo-data .pytest_cache .hypothesis
