#!/usr/bin/env bash
# Mutation testing (mutmut) of the code whose faults the unit tests must catch: the vector
# quantizer, and the cached sampler with the causal convolutions (the priors' masks).
#
#   scripts/mutation.sh [quantizer|sampling]...   # default: both, one after another
#
# Each target runs in a scratch copy of vq_core/ and tests/vq_core/ (mutmut rewrites the code it
# mutates), against that target's own test files only, one thread per test process. At the end
# it prints mutmut's per-mutant results; `survived` ones need a sharper test or a reason why they
# are harmless. Needs mutmut in the environment: .venv/bin/pip install "mutmut>=3.3".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
MUTMUT=${MUTMUT:-$(dirname "$PYTHON")/mutmut}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(quantizer sampling)

for target in "${targets[@]}"; do
  case "$target" in
    quantizer)
      files='"vq_core/quantizer.py"'
      # mutmut gives each mutant the tests that called its function in-process, so mutants of
      # the all-reduce and shared-draw paths (run only in the two-process test's children) can
      # show as survived: rerun those by hand with MUTANT_UNDER_TEST=<name> pytest <that test>
      # in the scratch copy's mutants/ folder.
      tests='"tests/vq_core/test_quantizer.py", "tests/vq_core/test_quantizer_distributed.py"'
      deselect='""'
      ;;
    sampling)
      # sampling.py holds the causal convolutions (the masks of both priors); the priors'
      # causality and cached-sampling tests are what catch their faults. The priors' learning
      # tests take minutes each and catch nothing the others miss.
      files='"vq_core/sampling.py"'
      tests='"tests/vq_core/test_sampling.py", "tests/vq_core/test_pixelcnn.py",
        "tests/vq_core/test_pixelsnail.py"'
      deselect='"not learns and not uses_the_top_codes"'
      ;;
    *)
      echo "unknown target $target (expected quantizer or sampling)" >&2
      exit 2
      ;;
  esac
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  mkdir -p "$scratch/tests"
  cp -r vq_core "$scratch/"
  cp -r tests/vq_core "$scratch/tests/"
  touch "$scratch/tests/__init__.py"
  cat > "$scratch/pyproject.toml" <<TOML
[tool.mutmut]
source_paths = ["vq_core/"]
only_mutate = [$files]
pytest_add_cli_args_test_selection = [$tests]
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-k", $deselect]
TOML
  echo "== $target"
  (cd "$scratch" && "$MUTMUT" run --max-children "${MUTATION_JOBS:-2}" >/dev/null 2>&1 || true)
  (cd "$scratch" && "$MUTMUT" results --all true) | tee "mutation-$target.txt"
  echo "-- $target: $(grep -c ': killed' "mutation-$target.txt" || true) killed," \
    "$(grep -c ': survived' "mutation-$target.txt" || true) survived," \
    "$(wc -l < "mutation-$target.txt") mutants (mutation-$target.txt)"
  rm -rf "$scratch"
  trap - EXIT
done
