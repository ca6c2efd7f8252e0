"""`tf-secondorder bytes`: bytes per replica per step against counts worked
out by hand from the layer's shape."""

import json
import math

import pytest

from tests.helpers import run_cli_in_subprocess
from tf_secondorder import cli
from tf_secondorder.bench.usage import UsageError


def test_float32_and_sign_bytes_match_the_count_by_hand(tmp_path):
    out = tmp_path / "bytes.json"
    result = run_cli_in_subprocess(
        ["bytes", "--replicas", "2", "--widths", "40,24"]
        + ["--compressions", "sign", "--out", str(out)]
    )
    assert "| sign | majority_vote |" in result.stdout
    rows = {
        (r["compression"], r["aggregation"]): r
        for r in json.loads(out.read_text())["rows"]
    }
    # One Dense layer 40 -> 24: a 40x24 kernel and 24 biases.
    sizes = [40 * 24, 24]
    float32 = rows["float32", "mean"]
    assert float32["parameters"] == sum(sizes)
    # An all-reduce hands over and gets back 4 bytes per parameter.
    assert float32["bytes_per_step"] == 4 * sum(sizes)
    assert float32["bytes_received_per_step"] == 4 * sum(sizes)
    # Signs: 1 bit per parameter, each tensor's bits packed into 32-bit
    # words (collectives take no 8-bit types), and one 32-bit word saying
    # whether the gradients were finite; all-gathered, so each replica gets
    # both replicas' words.
    words = sum(math.ceil(n / 32) for n in sizes) + 1
    for aggregation in ("mean", "majority_vote"):
        sign = rows["sign", aggregation]
        assert sign["bytes_per_step"] == 4 * words
        assert sign["bytes_received_per_step"] == 2 * 4 * words
        assert sign["sent_vs_float32"] == 4 * words / (4 * sum(sizes))
    assert rows["sign", "bidirectional"]["bytes_per_step"] > 0
    assert set(rows) == {
        ("float32", "mean"),
        ("sign", "mean"),
        ("sign", "majority_vote"),
        ("sign", "bidirectional"),
    }


@pytest.mark.parametrize(
    "args, name",
    [
        (["--replicas", "1"], "replicas"),
        (["--replicas", "2,x"], "replicas"),
        (["--widths", "64"], "widths"),
        (["--widths", "64,0"], "widths"),
        (["--compressions", "sign,zip"], "compressions"),
        (["--compressions", "sign,sign"], "compressions"),
    ],
)
def test_bad_arguments_are_named(args, name):
    with pytest.raises(UsageError, match=f"`{name}` must be"):
        cli.main(["bytes", *args])
