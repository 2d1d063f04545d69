#!/usr/bin/env bash
# Mutation testing (mutmut) of the code whose faults the unit tests must catch: the vector
# quantizer, the cached sampler with the causal convolutions (the priors' masks), the keys (split
# and hash order), the code shards, the CAS statistics and the metric code of evaluate.
#
#   scripts/mutation.sh [quantizer|sampling|keys|shards|cas|metrics]...   # default: all, in turn
#
# Each target runs in a scratch copy of vq_core/, pipelines/ and tests/ (mutmut rewrites the code
# it mutates), against that target's own fast test files only (no test that starts Ray: mutmut
# forks a process per mutant, and a Ray per mutant would cost minutes each), one thread per test
# process. mutmut leaves decorated functions (@torch.no_grad(), @property, ...) unmutated and has
# no setting for it, so scripts/undecorate.py first rewrites, in the scratch copy only, each one as
# the plain function followed by `name = decorator(name)`; only a lone @staticmethod /
# @classmethod (which mutmut mutates itself) and property setters are left as they are.
# At the end it prints mutmut's per-mutant results; `survived` ones need a sharper test or a
# reason why they are harmless (MUTATION_KEEP=1 keeps the scratch copy, to `mutmut show` one).
# Needs mutmut in the environment: .venv/bin/pip install "mutmut>=3.3".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
MUTMUT=${MUTMUT:-$(dirname "$PYTHON")/mutmut}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# The tests of the pipelines' target files that start Ray (the ray_local fixture, or a stage run).
NO_RAY="not folder_webdataset_and_parquet and not class_names_for_webdataset and not parquet_without_key"
NO_RAY+=" and not grey_and_rgb and not split_is_deterministic and not bad_input and not a_bad_image"
NO_RAY+=" and not resume_keys and not code_dataset_streams and not readers_skip_removed"
NO_RAY+=" and not raw_batches and not cache_holds and not each_epoch and not batches_mix"
NO_RAY+=" and not tokenize_manifest and not shard_member_names and not a_code_map and not cas_trains"

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(quantizer sampling keys shards cas metrics)

for target in "${targets[@]}"; do
  covered=false
  case "$target" in
    quantizer)
      files='"vq_core/quantizer.py"'
      # mutmut gives each mutant the tests that called its function in-process, so mutants of
      # the all-reduce and shared-draw paths (run only in the two-process test's children) can
      # show as survived: rerun those by hand with MUTANT_UNDER_TEST=<name> pytest <that test>
      # in the scratch copy's mutants/ folder. Done so, the survivors of _all_reduce_sum,
      # _shared_generator, _register_state, _sync_state_from_rank0 and _sample_global_rows are
      # equivalent for a user: the reduce op left to its default (SUM); another range or dtype
      # spelling of the drawn seed; other constants mixing (seed, step, stream) into the shared
      # generator (other draws, still the same on every rank and on resume); the flag that skips
      # the rank-0 broadcast after the first step (a broadcast per step of equal states);
      # randint's low bound left to its default; noise subtracted instead of added (the same
      # distribution); the noise scale's branch for a single draw (unreachable: one row drawn
      # with replacement means an empty batch, refused before). device= dropped or None: equal
      # on CPU, covered by the gpu tests.
      tests='"tests/vq_core/test_quantizer.py", "tests/vq_core/test_quantizer_distributed.py"'
      deselect='""'
      ;;
    sampling)
      # sampling.py holds the causal convolutions (the masks of both priors); the priors'
      # causality and cached-sampling tests are what catch their faults. The priors' learning
      # tests take minutes each and catch nothing the others miss.
      # Survivors, each equivalent for every input the priors and samplers pass: dim=+1 for
      # dim=-1 and defaulted dims in filter_logits / draw_categorical (their inputs are N x K);
      # shape[+2:] for shape[-2:] of 4-D tensors; the cache's start row and column (set before
      # every step); the fast path for one position taken less often (the general path gives
      # the same values); write extents that slicing clamps back, and empty writes; a larger
      # step buffer; one column more from StepCache.column (cached == naive still holds);
      # sample_codes' early check of top_k / top_p skipped (filter_logits refuses them at the
      # first step, before anything is returned); sample_levels' method left to the default
      # (both methods draw the same codes); device= dropped or None (the gpu tests).
      files='"vq_core/sampling.py"'
      tests='"tests/vq_core/test_sampling.py", "tests/vq_core/test_sampling_levels.py",
        "tests/vq_core/test_pixelcnn.py", "tests/vq_core/test_pixelsnail.py"'
      deselect='"not learns and not uses_the_top_codes"'
      ;;
    keys)
      # The split of a key and the hash order: the golden splits and hashes, the key tests of
      # the corpus, the split-reading tests of the shards and of the epoch reader.
      files='"pipelines/data/keys.py"'
      tests='"tests/pipelines/test_golden.py", "tests/pipelines/data/test_corpus.py",
        "tests/pipelines/data/test_shards.py",
        "tests/pipelines/data/test_epochs.py"'
      deselect="\"$NO_RAY\""
      ;;
    shards)
      # Known survivors, equivalent for every shard the writer accepts: another maxsplit or
      # index of rsplit("/") (the last component is the same); allow_pickle None/omitted/True
      # for unsigned arrays; the tar format left to Python (PAX is its default); pyarrow's
      # inferred types for non-empty key and source columns (tokenize writes no empty shard);
      # the order of the level fields in a read sample's dict; an error text with extra words.
      # The Ray readers (code_dataset and what it maps) have no Ray-free tests: "no tests".
      files='"pipelines/data/shards.py"'
      tests='"tests/pipelines/data/test_shards.py", "tests/pipelines/data/test_epochs.py"'
      deselect="\"$NO_RAY\""
      ;;
    cas)
      files='"pipelines/evaluation/cas.py"'
      tests='"tests/pipelines/evaluation/test_cas.py"'
      deselect='""'
      ;;
    metrics)
      # The metric code of evaluate: the figures computed from scores and counts (metrics.py)
      # and the feature-space figures. Only the lines these tests run are mutated (the rest of
      # metrics.py trains a judge or reads a corpus through Ray, and is checked end to end by
      # tests/pipelines/stages/test_evaluate.py and test_published_figures.py).
      files='"pipelines/evaluation/metrics.py", "pipelines/evaluation/feature_space.py"'
      tests='"tests/pipelines/evaluation/test_metrics.py",
        "tests/pipelines/evaluation/test_feature_space.py"'
      deselect="\"$NO_RAY and not on_demo_images\""
      covered=true
      ;;
    *)
      echo "unknown target $target (expected quantizer, sampling, keys, shards, cas or metrics)" >&2
      exit 2
      ;;
  esac
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  cp -r vq_core pipelines tests "$scratch/"
  find "$scratch" -name __pycache__ -prune -exec rm -rf {} +
  # shellcheck disable=SC2046  # the target's files, one word each
  (cd "$scratch" && "$PYTHON" "$ROOT/scripts/undecorate.py" $(echo "$files" | tr -d '",'))
  cat > "$scratch/pyproject.toml" <<TOML
[tool.mutmut]
source_paths = ["vq_core/", "pipelines/"]
only_mutate = [$files]
mutate_only_covered_lines = $covered
pytest_add_cli_args_test_selection = [$tests]
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-k", $deselect]
TOML
  echo "== $target"
  (cd "$scratch" && "$MUTMUT" run --max-children "${MUTATION_JOBS:-2}" >/dev/null 2>&1 || true)
  (cd "$scratch" && "$MUTMUT" results --all true) | tee "mutation-$target.txt"
  echo "-- $target: $(wc -l < "mutation-$target.txt") mutants:" \
    "$(sed 's/.*: //' "mutation-$target.txt" | sort | uniq -c | awk '{$1=$1; print}' | paste -sd,)" \
    "(mutation-$target.txt)"
  if [ -n "${MUTATION_KEEP:-}" ]; then
    # Keep the scratch copy to read a mutant: cd there, then mutmut show <mutant name>.
    echo "-- $target: scratch copy kept in $scratch"
  else
    rm -rf "$scratch"
  fi
  trap - EXIT
done
