"""`fedray init`: the decision tree, through click's test runner, writes job files that load."""

import pytest
from click.testing import CliRunner

from fedray.cli import main
from fedray.config import load_job

CASES = {  # flags -> what the job must hold
    "finance, balanced": (["--sensitive", "finance", "--balanced", "--ample-bandwidth", "--same-domain"],
                          {"strategy": "fedavg", "secure": "ckks", "privacy": None, "compression": None},
                          ["Finance data: updates are encrypted with CKKS"]),
    "general, unbalanced, slow links": (
        ["--sensitive", "general", "--unbalanced", "--limited-bandwidth", "--same-domain"],
        {"strategy": "fedprox", "secure": None, "privacy": "client", "compression": ["quantize", "entropy"]},
        ["client-level differential privacy", "client-level DP does not cover per-device step counts",
         "Synchronous rounds: client-level DP accounts sampled rounds"]),
    "unbalanced": (["--sensitive", "none", "--unbalanced", "--ample-bandwidth", "--same-domain"],
                   {"strategy": "fednova", "secure": None, "privacy": None, "compression": None},
                   ["FedNova normalizes each device's update"]),
    "slow links, new domain": (
        ["--dataset", "digits", "--sensitive", "none", "--balanced", "--limited-bandwidth", "--new-domain"],
        {"strategy": "fedbuff", "secure": None, "privacy": None, "compression": ["quantize", "entropy"]},
        ["FedBuff folds updates as they arrive", "start from the pretrained models:/mnist-cnn/latest"]),
    "medical, slow links": (["--sensitive", "medical", "--unbalanced", "--limited-bandwidth", "--same-domain"],
                            {"strategy": "fedbuff", "secure": "ckks", "privacy": None, "compression": ["quantize"]},
                            ["inside the encryption each value gets 4 bits", "cannot weigh ciphertexts"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_init_writes_a_valid_job_that_explains_each_choice(tmp_path, case):
    flags, expected, explained = CASES[case]
    out = tmp_path / "job.yaml"
    result = CliRunner().invoke(main, ["init", "--out", str(out), "--name", "mine", *flags])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    job = load_job(out)  # what `fedray run` loads and validates
    text = out.read_text()
    assert job.name == "mine" and job.strategy.name == expected["strategy"]
    assert (job.secure and job.secure.scheme) == expected["secure"]
    assert (job.privacy and job.privacy.level) == expected["privacy"]
    assert (job.compression and [s.kind for s in job.compression.uplink]) == expected["compression"]
    for phrase in explained:
        assert phrase in text, phrase
    assert text.startswith("# mine: written by `fedray init`")
    if "--new-domain" in flags:  # the head is replaced, and alone trains
        assert job.model.start == "models:/mnist-cnn/latest" and job.model.replace == job.model.train == ["10"]
        assert job.data.resize == (28, 28)
    if "--unbalanced" in flags:
        assert job.data.partition.kind == "dirichlet"


def test_init_asks_what_was_not_given_and_keeps_an_existing_file(tmp_path):
    out = tmp_path / "asked.yaml"
    answers = "medical\ny\nn\nn\n"
    result = CliRunner().invoke(main, ["init", "--out", str(out), "--dataset", "digits"], input=answers)
    assert result.exit_code == 0, result.output
    assert "Is the data sensitive?" in result.output and "Is bandwidth limited?" in result.output
    job = load_job(out)
    assert job.data.dataset == "digits" and job.secure.scheme == "ckks" and job.strategy.name == "fedavg"
    again = CliRunner().invoke(main, ["init", "--out", str(out)], input=answers)
    assert again.exit_code == 1 and "exists; give another --out, or --force" in again.output
    assert load_job(out) == job
    bad = CliRunner().invoke(main, ["init", "--out", str(tmp_path / "x.yaml"), "--sensitive", "secret"])
    assert bad.exit_code == 2 and "'secret' is not one of" in bad.output
