#!/usr/bin/env bash
# The test suite as a clone with nothing beside it sees it: $LLAMA2_SHARED an empty folder and
# ../shared hidden (an empty read-only mount in a private mount namespace, where one can be made;
# nothing outside this process tree sees it). Runs the test binaries that name shared material
# (the others read none: the full run covers them), and checks that they pass, that one line
# names each missing item with the command that gets it, and that the fixtures the repository
# carries are not skipped. Output in target/bare-clone-tests.log. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
log=target/bare-clone-tests.log
mkdir -p target
mapfile -t tests < <(grep -lE 'tinyshakespeare|hh-harmless|tokenizer/llama2|fixtures/' \
  tests/*.rs engine/tests/*.rs trainer/tests/*.rs | sed -E 's#.*/([^/]+)\.rs$#--test=\1#')
empty=$(mktemp -d)
cmd=(env LLAMA2_SHARED="$empty" LLAMA2_SHARED_REQUIRED=0 cargo test --release --workspace --locked "${tests[@]}")
hide='mount -t tmpfs -o ro none ../shared'
if [ -d ../shared ] && unshare -m sh -c "$hide" 2>/dev/null; then
  unshare -m sh -c "$hide"' && exec "$@"' - "${cmd[@]}" 2>&1 | tee "$log"
else
  echo "bare clone: ../shared left as it is (absent, or no mount namespace here)"
  "${cmd[@]}" 2>&1 | tee "$log"
fi
rmdir "$empty"
# A skip line may follow the harness's "test NAME ... " on the same line (tests run in parallel,
# and the harness writes a result in two parts), so the lines are matched anywhere, not at ^.
for want in "data/tinyshakespeare.txt|fetch_data.py shakespeare" \
  "data/hh-harmless-pairs.jsonl|fetch_data.py hh" \
  "tokenizer/llama2/tokenizer.json|fetch_data.py llama2-tokenizer"; do
  if ! grep -qE "skipped [^ ]+: ${want%|*} not found in .*; get it with: .*${want#*|}" "$log"; then
    echo "bare clone: no skip line names ${want%|*} and \`${want#*|}\`"
    exit 1
  fi
done
if grep -E "skipped [^ ]+: fixtures/" "$log"; then
  echo "bare clone: the fixtures the repository carries were skipped"
  exit 1
fi
echo "bare clone: ${#tests[@]} test binaries passed, $(grep -oE 'skipped [^ ]+: [^ ]+ not found in' "$log" | wc -l) skip lines"
