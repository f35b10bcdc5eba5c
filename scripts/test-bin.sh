# Sourced by the gpu-sim scripts: `test_bin TARGET [KIND]` prints the path of the workspace's
# test binary for TARGET (an integration test's name, or `engine` with KIND lib for the engine's
# unit tests), built as README's test command builds it (`--workspace`, so the same features and
# no rebuild).
test_bin() {
    local name=$1 kind=${2:-test}
    cargo test --release --locked --workspace --no-run --message-format=json 2>/dev/null |
        python3 -c 'import sys, json
name, kind = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("name") == name and kind in t.get("kind", []):
        print(m["executable"])' "$name" "$kind" | head -n 1
}
