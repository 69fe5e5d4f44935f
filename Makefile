# The two commands of the README. Both set everything up first (scripts/setup.sh: the active virtual
# environment, else ./.venv; idempotent, about a second once done).
#   make quickstart   fine-tune the embedded default model (ARGS="--trainer.max_steps 20" to shorten it)
#   make test         run the test suite (ARGS="-m 'not slow'" to skip the real-model tests)
.PHONY: quickstart test setup
ARGS ?=

setup:
	@scripts/setup.sh >/dev/null

quickstart:
	@PY=$$(scripts/setup.sh) && $$PY -m lightning_ft fit --config configs/quickstart.yaml \
		--config configs/forgetting_quickstart.yaml $(ARGS)

# The environment's bin directory first on PATH: the tests also run the `lightning_ft` console script.
test:
	@PY=$$(scripts/setup.sh) && PATH="$$(dirname $$PY):$$PATH" $$PY -m pytest -q -m "" $(ARGS)
