"""The extension points of aggregators: a compressor declares what it needs,
and the config and the communicator ask it instead of testing its type."""

import pytest

import tf_secondorder.compression as C
from tf_secondorder.compression.compressor import register_multi_round
from tf_secondorder.distribute import aggregators
from tf_secondorder.distribute.communicator import make_aggregator
from tf_secondorder.distribute.config import CommunicationConfig, Constraint
from tf_secondorder.distribute.error_feedback import ErrorFeedback


@register_multi_round
class ThreeRounds:
    """A stand-in multi-round compressor: only what the config reads."""

    rounds = 3
    aggregations = ("mean",)
    error_feedback_default = False
    sign_based = False
    carries_magnitude = True


@aggregators.serves(ThreeRounds)
class ThreeRoundsMean(aggregators.Aggregator):
    def __init__(self, compressor):
        self.compressor = compressor


def test_a_registered_multi_round_compressor_gets_its_own_aggregator():
    compressor = ThreeRounds()
    aggregator = make_aggregator(CommunicationConfig(compression=compressor))
    assert type(aggregator) is ThreeRoundsMean
    assert aggregator.compressor is compressor


def test_a_subclass_is_served_by_its_parent_s_aggregator():
    class RankTwo(C.PowerSGD):
        pass

    aggregator = make_aggregator(CommunicationConfig(compression=RankTwo(rank=2)))
    # PowerSGD is biased: error feedback wraps its aggregator.
    assert type(aggregator) is ErrorFeedback
    assert type(aggregator.inner) is aggregators.PowerSGDMean


@pytest.mark.parametrize("aggregation", ["majority_vote", "bidirectional"])
def test_the_config_asks_the_compressor_which_aggregations_it_accepts(aggregation):
    with pytest.raises(ValueError, match="^`aggregation`"):
        CommunicationConfig(compression=ThreeRounds(), aggregation=aggregation)
    assert "bidirectional" not in C.RandomK().aggregations
    assert "majority_vote" in C.Sign().aggregations


@pytest.mark.parametrize("compressor", [ThreeRounds(), C.PowerSGD()])
def test_local_sgd_refuses_a_compressor_of_several_rounds(compressor):
    with pytest.raises(ValueError, match="^`average_compression`.*rounds"):
        CommunicationConfig(average_every=4, average_compression=compressor)


def test_a_constraint_names_the_optimizer_s_argument():
    constraint = Constraint("average_every", "root_refresh", "'in_step'", "pipelined")
    constraint.check({"average_every": None})
    constraint.check({})
    with pytest.raises(ValueError, match="^`root_refresh`.*'in_step'.*pipelined"):
        constraint.check({"average_every": 4})
