"""Update compression, side by side, on the MNIST non-IID job (jobs/mnist_noniid.yaml).

    .venv/bin/python benchmarks/compression.py [--rounds 200] [--only NAME ...] [--secure]

Every codec chain trains the same job from the same seed (100 devices, Dirichlet(0.5) labels, 10
per round, the small CNN), with 5 local epochs (``--set``): as shipped, one epoch of a device's
32 samples is one SGD step, and float32 reaches only 0.76 in 50 rounds. With 5 epochs float32
is still climbing at 50 rounds (0.907) and levels off by 200 (0.945), the default: final
accuracies compare trained models, not how fast each chain gets there (rounds to target does).
A simulated network gives each device a 10 Mbit/s downlink and a 1 Mbit/s uplink, and the
edge-cloud link 1 Gbit/s, so each round's communication time follows from the bytes actually
sent (``sim_comm_seconds``). Printed per chain:

- up ratio: float32 bytes of an uncompressed update over the bytes sent (the serialized payload,
  header included), as the run's ``bytes_up`` counts them; "down" chains also compress the
  broadcast (``compression.downlink``);
- final accuracy: the held-out accuracy averaged over the last 5 rounds (one round's value swings
  by a point or more on non-IID data), and its difference from float32's;
- rounds to target and simulated communication time to target, against float32's; the target is
  float32's final accuracy less 2 points, which every useful chain should reach.

``--secure`` runs the same job under CKKS (``secure: {scheme: ckks, preset: balanced}``) with the
codecs that work inside encryption, against CKKS alone: shared random-k encrypts fewer values,
quantize packs more values into each slot (over ``+-secure.range``, which a chain may set).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedray.config import load_job  # noqa: E402
from fedray.platform.run import connect, run_job  # noqa: E402

NETWORK = "network={device_edge: {bandwidth_mbps: 10, up_mbps: 1}, edge_cloud: {bandwidth_mbps: 1000}}"
TOP1 = "{kind: topk, fraction: 0.01}"
Q4 = "{kind: quantize, bits: 4}, {kind: entropy}"
CHAINS = {
    "float32": None,
    "entropy": "[{kind: entropy}]",
    "q8 + entropy": "[{kind: quantize, bits: 8}, {kind: entropy}]",
    "q4 + entropy": f"[{Q4}]",
    "q2 + entropy": "[{kind: quantize, bits: 2}, {kind: entropy}]",
    "q2 + entropy, q4 down": "[{kind: quantize, bits: 2}, {kind: entropy}]",
    "q1 + entropy": "[{kind: quantize, bits: 1}, {kind: entropy}]",
    "sign + entropy": "[{kind: sign}, {kind: entropy}]",
    "lowrank r2 + q8": "[{kind: lowrank, rank: 2}, {kind: quantize, bits: 8}, {kind: entropy}]",
    "randk 10% + q8": "[{kind: randk, fraction: 0.1}, {kind: quantize, bits: 8}, {kind: entropy}]",
    "topk 10% + q8 + entropy": "[{kind: topk, fraction: 0.1}, {kind: quantize, bits: 8}, {kind: entropy}]",
    "topk 5% + q2 + entropy": "[{kind: topk, fraction: 0.05}, {kind: quantize, bits: 2}, {kind: entropy}]",
    "topk 3% + q2 + entropy": "[{kind: topk, fraction: 0.03}, {kind: quantize, bits: 2}, {kind: entropy}]",
    "topk 2% + q4 + entropy": f"[{{kind: topk, fraction: 0.02}}, {Q4}]",
    "topk 2% per layer + q4": f"[{{kind: topk, fraction: 0.02, per_layer: true}}, {Q4}]",
    "topk 1% + q4 + entropy": f"[{TOP1}, {Q4}]",
    "topk 1% + q4, no EF": f"[{TOP1}, {Q4}]",
    "topk 1% + q4, DGC warm-up": f"[{TOP1}, {Q4}]",
}
CKKS = "secure={scheme: ckks, preset: balanced, min_clients: 5}"
RANDK = "{kind: randk, fraction: 0.5, shared: true}"
SECURE_CHAINS = {
    "ckks": None,
    "ckks q8": "[{kind: quantize, bits: 8}]",
    "ckks q8, range 0.25": "[{kind: quantize, bits: 8}]",
    "ckks q4, range 0.25": "[{kind: quantize, bits: 4}]",
    "ckks q4, range 0.1": "[{kind: quantize, bits: 4}]",
    "ckks q2, range 0.1": "[{kind: quantize, bits: 2}]",
    "ckks randk 50%": f"[{RANDK}]",
    "ckks randk 50% + q8, range 0.25": f"[{RANDK}, {{kind: quantize, bits: 8}}]",
}
EXTRA = {"q2 + entropy, q4 down": ["compression.downlink=[{kind: quantize, bits: 4}, {kind: entropy}]"],
         "topk 1% + q4, no EF": ["compression.error_feedback=false"],
         "topk 1% + q4, DGC warm-up": ["compression.warmup_rounds=5"],
         **{name: [f"secure.range={name.rsplit(' ', 1)[1]}"] for name in SECURE_CHAINS if "range" in name}}


def run(name: str, rounds: int, uri: str, extra: list[str]) -> list:
    overrides = [*extra, f"rounds={rounds}", "tracking.experiment=bench-compression", "tracking.log_model=false", NETWORK]
    chain = CHAINS.get(name) or SECURE_CHAINS.get(name)
    if name in SECURE_CHAINS:
        overrides.append(CKKS)
    if chain is not None:
        overrides.append(f"compression={{uplink: {chain}}}")
    job = load_job(ROOT / "jobs" / "mnist_noniid.yaml", overrides + EXTRA.get(name, []))
    log = []
    run_job(job, job.model_dump_json(), uri, on_round=log.append)
    return [h.metrics for h in log]


def final(metrics: list, rounds: int | None = None) -> float:
    """The held-out accuracy averaged over the 5 rounds up to ``rounds`` (default: the last)."""
    last = metrics[:rounds][-5:]
    return sum(m["test_accuracy"] for m in last) / len(last)


def per_update(metrics: list) -> float:
    """Bytes sent up per update, headers included."""
    return sum(m["bytes_up"] for m in metrics) / sum(m["participants"] for m in metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--only", nargs="*", default=[], help="chains to run (float32, or ckks, always runs)")
    parser.add_argument("--secure", action="store_true", help="the CKKS chains, against CKKS alone")
    parser.add_argument("--set", nargs="*", default=["devices.local.epochs=5"],
                        help="overrides of the job for every chain, as fedray run's [default: devices.local.epochs=5]")
    args = parser.parse_args()
    chains = SECURE_CHAINS if args.secure else CHAINS
    first, *rest = chains
    names = [first] + [n for n in rest if not args.only or n in args.only]
    connect()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = run(name, args.rounds, uri, args.set)

    def to_target(metrics: list, target: float) -> tuple[int | None, float]:
        seconds = 0.0
        for r, m in enumerate(metrics, 1):
            seconds += m["sim_comm_seconds"]
            if m["test_accuracy"] >= target:
                return r, seconds
        return None, float("nan")

    base = results[first]
    target = final(base) - 0.02
    base_rounds, base_seconds = to_target(base, target)
    print(f"\nMNIST non-IID (100 devices, Dirichlet 0.5, 10 per round), {args.rounds} rounds; uplink 1 Mbit/s, "
          f"downlink 10 Mbit/s; target accuracy {target:.4f} ({first}'s final less 2 points)"
          + (f"; with {' '.join(args.set)}" if args.set else ""))
    early = 50 if args.rounds > 50 else None  # also the difference after 50 rounds, while float32 still climbs
    print(f"{'chain':32s} {'bytes/update':>12s} {'up ratio':>9s} {'KB down':>8s} {'final acc':>9s} {'vs base':>7s} "
          + (f"{'at 50':>7s} " if early else "")
          + f"{'rounds':>6s} {'comm s':>8s} {'time ratio':>10s}" + (" clipped" if args.secure else ""))
    for name, metrics in results.items():
        rounds, seconds = to_target(metrics, target)
        down = sum(m["bytes_down"] for m in metrics) / 1e3
        print(f"{name:32s} {per_update(metrics):12.0f} {per_update(base) / per_update(metrics):9.1f} {down:8.0f} "
              f"{final(metrics):9.4f} {100 * (final(metrics) - final(base)):+6.2f}p "
              + (f"{100 * (final(metrics, early) - final(base, early)):+6.2f}p " if early else "")
              + f"{rounds or '-':>6} "
              f"{seconds:8.2f} {seconds / base_seconds:10.3f}"
              + (f" {sum(m.get('clipped_fraction', 0) for m in metrics) / len(metrics):7.4f}" if args.secure else ""))
    print(f"({first} reaches the target in round {base_rounds}, after {base_seconds:.2f} s of communication)")


if __name__ == "__main__":
    main()
