# Helpers shared by bench/unet.sh and bench/sample.sh (sourced, not run).

# Installs PyTorch and numpy into the virtual environment $1 from PyPI when they are missing.
ensure_torch() {
  local venv=$1
  if ! "$venv/bin/python" -c "import torch, numpy" 2>/dev/null; then
    echo "== installing PyTorch (CPU use) into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch numpy
  fi
}

# Builds the release target `$2` of package `$1` (an example, or a binary with `$3` = bin) and
# prints the path of the executable as cargo reports it, so CARGO_TARGET_DIR, --target-dir in
# .cargo/config and the like are honoured. Compiler diagnostics go to stderr.
build_example() {
  local pkg=$1 name=$2 kind=${3:-example}
  echo "== building $kind $name of $pkg (release)" >&2
  cargo build --release --quiet -p "$pkg" "--$kind" "$name" --message-format=json-render-diagnostics \
    | python3 -c '
import json, sys
name, kind = sys.argv[1], sys.argv[2]
exe = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("name") == name and kind in t.get("kind", []) and m.get("executable"):
        exe = m["executable"]
if not exe:
    sys.exit(f"cargo reported no executable for {kind} {name}")
print(exe)
' "$name" "$kind"
}
