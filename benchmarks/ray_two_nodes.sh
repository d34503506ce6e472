#!/usr/bin/env bash
# A sweep on a two-node Ray cluster, both nodes on this one machine (1 CPU each): the head from
# `ray start --head`, a worker node from `ray start --address=...`, and `tlexp sweep --executor ray
# --ray-address HEAD` joining it. Prints on which nodes the cells ran. The cluster is stopped at the end
# (its own processes only, found by its private temp folder: other Ray instances on the machine live on).
#
#     nice bash benchmarks/ray_two_nodes.sh            # PY=/path/to/python to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RAY="$(dirname "$PY")/ray"
PORT=${PORT:-6391}
work=$(mktemp -d /tmp/tlray.XXXX)  # short: Ray's unix sockets live under it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=disabled
stop_cluster() {
    pids=$(pgrep -f -- "$work" || true)
    [ -n "$pids" ] && kill $pids 2>/dev/null; sleep 2
    pids=$(pgrep -f -- "$work" || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    rm -rf "$work"
}
trap stop_cluster EXIT

t0=$(date +%s.%N)
"$RAY" start --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus 1 --include-dashboard=false \
    --temp-dir "$work/ray" --disable-usage-stats >/dev/null
"$RAY" start --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus 1 \
    --temp-dir "$work/ray" --disable-usage-stats >/dev/null
echo "cluster up in $(echo "$(date +%s.%N) - $t0" | bc) s"

export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db" TLEXP_CACHE_DIR="$work/cache"
/usr/bin/time -f "sweep wall time %e s" "$PY" -m tlexp sweep --executor ray --ray-address "127.0.0.1:$PORT" \
    --strategies scratch --seeds 0,1 --samples-per-class 10 --model tinycnn --data digits --image-size 16 \
    --epochs 3 --experiment two-nodes --quiet

"$PY" - <<'PYEOF'
from mlflow.tracking import MlflowClient
client = MlflowClient()
exp = client.get_experiment_by_name("two-nodes")
runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("tlexp.kind") == "train"]
nodes = {r.data.tags.get("tlexp.ray_node_id") for r in runs}
print(f"{len(runs)} cells, {sum(r.info.status == 'FINISHED' for r in runs)} FINISHED, on {len(nodes)} Ray node(s)")
PYEOF
