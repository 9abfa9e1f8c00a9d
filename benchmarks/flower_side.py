"""Flower side of the fedray-vs-Flower benchmark: FedAvg on a workload .npz in a Flower simulation.

Run with the Flower venv (see setup_flower.sh), not fedray's:

    .venv-flower/bin/python benchmarks/flower_side.py --workload W.npz --rounds R --per-round K \
        --epochs E --lr 0.05 --batch-size 32 --seed 0 --out result.json

Model and local training are fedray's own code (``fedray.models.zoo.small_cnn`` and
``fedray.agents.training``), so both frameworks train identically; only the orchestration differs.
Round r's time runs from the end of the centralized evaluation after round r-1 (round 0: the initial
one) to the end of the one after round r: sampling, sending the global model, local training,
aggregation and one test-set evaluation. Round 1 also pays for Flower starting its Ray actors.

Deviations from a stock Flower app, all to make the two sides comparable:
- Each round's K devices are picked with fedray's sampler (``np.random.default_rng([seed, 1])``,
  sorted ``choice(N, K, replace=False)``, as in fedray/platform/driver.py) and named in the train
  message, so both frameworks train the same devices with the same per-(seed, round, device) RNG.
  Flower still samples which K of its N (stateless, virtual) nodes carry them.
- Ray is initialised here, with the arguments Flower would use, so that starting the Ray cluster is
  not counted in round 1 (fedray's rounds do not include it either).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# No network: keep Flower's telemetry and Ray's usage stats from trying to phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,  # noqa: E402
                      RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402

from fedray.agents.training import LocalTraining, device_generator, evaluate, train  # noqa: E402
from fedray.models.zoo import small_cnn  # noqa: E402

INPUT_SHAPE, NUM_CLASSES = (1, 28, 28), 10

# Per-process cache (one per Ray actor): the workload is read once per actor, not once per message.
_cache: dict = {}


def _workload(path: str) -> dict:
    if _cache.get("path") != path:
        with np.load(path) as w:
            _cache.clear()
            _cache.update(path=path, **{k: torch.from_numpy(w[k]) for k in
                                        ("x_train", "y_train", "device_offsets", "device_index")})
    return _cache


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # one core per client, matching the actor's num_cpus=1
    cfg = msg.content["config"]
    device = int(cfg["device"])
    w = _workload(str(cfg["workload"]))
    rows = w["device_index"][w["device_offsets"][device]:w["device_offsets"][device + 1]]
    x, y = w["x_train"][rows], w["y_train"][rows]

    model = small_cnn(INPUT_SHAPE, NUM_CLASSES)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    local = LocalTraining(epochs=int(cfg["epochs"]), batch_size=int(cfg["batch-size"]), optimizer="sgd",
                          lr=float(cfg["lr"]))
    _, loss = train(model, x, y, local, device_generator(int(cfg["seed"]), int(cfg["server-round"]), device))

    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train-loss": loss, "num-examples": len(x)})})
    return Message(content=content, reply_to=msg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--per-round", type=int, required=True, help="devices trained per round (K)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import flwr
    import ray
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    # This file's importable twin (benchmarks/ is sys.path[0], which reaches the Ray workers through
    # PYTHONPATH): Flower re-sends the ClientApp with every message, and Ray pickles one from
    # __main__ by value but this one by reference, so the per-actor cache above survives.
    import flower_side

    workload = str(Path(args.workload).resolve())
    with np.load(workload) as w:
        num_devices = len(w["device_offsets"]) - 1
        x_test, y_test = torch.from_numpy(w["x_test"]), torch.from_numpy(w["y_test"])
    if not 0 < args.per_round <= num_devices:
        p.error(f"--per-round must be in 1..{num_devices}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = small_cnn(INPUT_SHAPE, NUM_CLASSES)
    initial = ArrayRecord(model.state_dict())

    class FedAvgFedraySampling(FedAvg):
        """FedAvg whose K train messages name the devices fedray's sampler picks this round."""

        sampler = np.random.default_rng([args.seed, 1])

        def configure_train(self, server_round, arrays, config, grid):
            messages = list(super().configure_train(server_round, arrays, config, grid))
            devices = np.sort(self.sampler.choice(num_devices, args.per_round, replace=False))
            return [Message(RecordDict({self.arrayrecord_key: arrays,
                                        self.configrecord_key: ConfigRecord({**config, "device": int(d)})}),
                            dst_node_id=m.metadata.dst_node_id, message_type=MessageType.TRAIN)
                    for m, d in zip(messages, devices, strict=True)]

    stamps: list[float] = []
    accuracy: list[float] = []

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss_sum, correct = evaluate(model, x_test, y_test)
        stamps.append(time.perf_counter())
        if server_round > 0:
            accuracy.append(correct / len(y_test))
        return MetricRecord({"accuracy": correct / len(y_test), "loss": loss_sum / len(y_test)})

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        strategy = FedAvgFedraySampling(
            # int(N * K/N) may round down to K-1; min_train_nodes=K then makes it exactly K.
            fraction_train=args.per_round / num_devices, min_train_nodes=args.per_round,
            fraction_evaluate=0.0,  # no federated evaluation
            min_available_nodes=num_devices,
        )
        train_config = ConfigRecord({"workload": workload, "epochs": args.epochs, "lr": args.lr,
                                     "batch-size": args.batch_size, "seed": args.seed})
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.rounds,
                       train_config=train_config, evaluate_fn=central_evaluate)

    # What flwr's RayBackend.init_ray does (it skips it when Ray is already up), with
    # run_simulation's default init_args.
    pythonpath = os.pathsep.join(sys.path + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, include_dashboard=False,
             logging_level="WARNING", log_to_driver=True)
    run_simulation(
        server_app=server_app,
        client_app=flower_side.client_app,
        num_supernodes=num_devices,
        backend_name="ray",
        # Flower's default is 2 CPUs per client (one actor on this 2-core box); 1 CPU gives one
        # single-threaded actor per core.
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )

    if len(accuracy) != args.rounds:
        sys.exit(f"simulation finished {len(accuracy)} of {args.rounds} rounds (see Flower's log above)")
    result = {
        "round_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
        "accuracy": accuracy,
        "final_accuracy": accuracy[-1],
        "flwr_version": flwr.__version__,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
