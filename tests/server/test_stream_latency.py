"""The stream-latency fit: what streams measured, as a function of the engine's occupancy over their life.

Pure: synthetic streams from a known line, time a variable. The feed-forward tests at the end check that
the choice of k follows the fit where it and the engine's step model disagree.
"""

from __future__ import annotations

import random

import pytest

from phds_serve.declared_k import KContract, KPolicy
from phds_serve.server.brownout import Objectives
from phds_serve.server.dispatch import Dispatcher
from phds_serve.server.feedforward import PROMPT_TOKENS_PRIOR, Demand, EngineState, choose, predict
from phds_serve.server.load_feed import LoadFeed
from phds_serve.server.predictive import PredictiveBrownout, PredictiveSettings
from phds_serve.server.request_k import LayerConfig
from phds_serve.server.service_model import ServiceModel
from phds_serve.server.stream_latency import INF, Occupancy, StreamLatency
from phds_serve.tiers import parse_tier_spec

SHAPE = (0.006, 0.0004, 0.0001, 0.00006, 0.00002)  # a calibrated step model: 6 ms + 0.4 ms/row + 0.1 ms/row-k
KS = [8, 7, 6, 5, 4, 3, 2]


def streams_line(rows: float, k_sum: float) -> float:
    """What the streams of the test measure: 7 ms plus 3x the rows' engine cost."""
    return 0.007 + 3.0 * (SHAPE[1] * rows + SHAPE[2] * k_sum)


def fitted(noise: float = 0.0, seed: int = 0) -> StreamLatency:
    rng = random.Random(seed)
    fit = StreamLatency()
    for _ in range(200):
        rows, k = rng.uniform(1, 16), rng.choice([2, 5, 8])
        fit.observe(rows, rows * k, 0.0, streams_line(rows, rows * k) * (1 + noise * rng.random()))
    return fit


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_occupancy_means_are_time_weighted():
    occ = Occupancy()
    occ.set(0.0, 2, 16)
    mark = occ.mark(0.5)
    occ.set(1.5, 4, 12)  # 2 requests at k 8 for 1 s since the mark, then 4 at k 3 for 1 s
    occ.add_prefill(0.3)  # a request entered: 0.3 s of prefill, within the interval
    assert occ.mean_since(mark, 2.5) == pytest.approx((3.0, 14.0, 0.15))
    assert occ.mean_since(occ.mark(3.0), 3.0) is None


def test_the_fit_recovers_the_line_streams_measured_and_its_quantile():
    m = ServiceModel(shape=SHAPE)
    exact = fitted()
    assert exact.ready()
    exact.fit(m)
    assert (exact.base_s, exact.per_cost) == pytest.approx((0.007, 3.0), rel=1e-6)
    assert exact.quantile_ratio == pytest.approx(1.0)
    assert exact.mean_s(m, 16, 16 * 8) == pytest.approx(streams_line(16, 16 * 8))
    noisy = fitted(noise=0.4)  # up to 40 % slower, uniformly: measured/fitted spreads around ~1.2
    noisy.fit(m)
    assert 1.1 < noisy.quantile_ratio < 1.4
    assert noisy.quantile_s(m, 8, 32) == pytest.approx(noisy.quantile_ratio * noisy.mean_s(m, 8, 32))
    assert not StreamLatency().ready()


def test_the_steady_state_is_littles_law_and_a_load_beyond_it_does_not_settle():
    m, fit = ServiceModel(shape=SHAPE), fitted()
    ttft, steps = 0.05, 31
    s = fit.steady(m, 10.0, 4.0, ttft, steps, slots=16)
    assert 0 < s.rows < 16
    # N requests in the engine = arrival rate x time each spends there, at the latency N of them see.
    assert s.rows == pytest.approx(10.0 * (ttft + steps * fit.mean_s(m, s.rows, 4.0 * s.rows)))
    assert fit.steady(m, 10.0, 8.0, ttft, steps, 16).rows > s.rows  # a higher k holds more in the engine
    assert fit.steady(m, 60.0, 8.0, ttft, steps, 16).rows == INF  # no solution
    assert fit.steady(m, 14.0, 8.0, ttft, steps, 8).rows == INF  # a solution beyond the slots


def test_the_choice_follows_what_streams_measured_where_the_step_model_is_too_optimistic():
    """Streams 3x slower per row than the engine's steps: at 8 requests/s the step model keeps k 8,
    the fit says its streams would miss and picks a lower k; at a calm rate both keep k 8."""
    m, fit = ServiceModel(shape=SHAPE), fitted()
    obj = Objectives(ttft_s=0.5, itl_s=0.03)
    busy, state = Demand(8.0, 96, 32), EngineState((), 16)
    assert choose(KS, m, obj, state, busy, [0.0]).k == 8
    c = choose(KS, m, obj, state, busy, [0.0], latency=fit)
    assert c.k < 8 and c.prediction.meets
    at8 = c.considered[0]
    assert not at8.meets and (at8.itl_s > 0.8 * 0.03 or at8.steady_rows > 0.9 * 16)
    assert choose(KS, m, obj, state, Demand(1.0, 96, 32), [0.0], latency=fit).k == 8
    # The other tiers' arrivals count: the same rate, split with a tier fixed at k 8, still lowers k.
    split = Demand(4.0, 96, 32, other_rps=4.0, other_rps_k=32.0)
    assert choose(KS, m, obj, state, split, [0.0], latency=fit).k < 8
    assert choose(KS, m, obj, state, Demand(4.0, 96, 32), [0.0], latency=fit).k > (
        choose(KS, m, obj, state, split, [0.0], latency=fit).k)


def controller(clock: Clock, slots: int = 32, objectives: Objectives = Objectives(ttft_s=0.5, itl_s=0.12),
               settings: PredictiveSettings = PredictiveSettings()) -> PredictiveBrownout:
    """A predictive controller for one elastic tier (balanced=8..2) on the test's step model."""
    config = LayerConfig(contract=KContract(KPolicy(native_k=8, num_experts=32), True),
                         tiers=parse_tier_spec("balanced=8..2"), objectives=objectives)
    return PredictiveBrownout(config, settings, slots, LoadFeed(), clock, ServiceModel(shape=SHAPE))


def test_a_finished_stream_is_a_sample_with_the_occupancy_of_its_own_decode():
    """Through the controller: the dispatch queue's occupancy, marked at the stream's first token, gives the
    mean requests and summed k over its decode, whatever was in the engine before, and the share of that
    time the prefills of the requests dispatched meanwhile take (its own prefill, before it, not)."""
    clock = Clock()
    pb = controller(clock)
    model = pb.model
    assert isinstance(pb.dispatcher, Dispatcher)
    a = pb.dispatcher.enter(0, 0.5, "balanced", prompt_tokens=400)
    clock.t = 1.0
    pb.first_token(a, 1.0)
    b = pb.dispatcher.enter(0, 1.5, "balanced", fixed_k=2, prompt_tokens=100)
    clock.t = 2.0  # a and b (k 8 + 2) for 1 s
    pb.dispatcher.done(b)
    clock.t = 4.0  # a alone for 2 s
    pb.observed_itl(a, 0.02)
    (rows, k_sum, prefill, itl), = pb.latency.samples
    assert (rows, k_sum, itl) == pytest.approx(((2 + 2 * 1) / 3, (10 + 2 * 8) / 3, 0.02))
    assert prefill == pytest.approx(100 * model.token_s(2) / 3)  # b's prompt at k 2 over a's 3 s of decode


def test_a_request_of_unknown_length_counts_the_same_prompt_in_the_measurement_and_the_prediction():
    """Before any response has reported its usage, a chat request carries no prompt estimate: the prefill
    its dispatch adds to the streams' P and the prompt the prediction assumes are one prior, not 0 and 128."""
    clock = Clock()
    pb = controller(clock)
    model = pb.model
    added: list[float] = []
    pb.dispatcher.occupancy.add_prefill = added.append
    ticket = pb.dispatcher.enter(0, 0.5, "balanced", fixed_k=2)  # no prompt_tokens: a chat request
    assert added == [pytest.approx(PROMPT_TOKENS_PRIOR * model.token_s(2))]
    assert pb.demand(ticket, clock.t).prompt_tokens == PROMPT_TOKENS_PRIOR


def test_a_steady_state_that_needs_more_slots_than_the_engine_has_fails_k_whatever_its_latency():
    """Four slots and a loose objective (100 ms): at k 8, 7 and 6 the load would hold more streams than
    0.9 x 4 slots (requests would queue for slots, their TTFT unbounded) though each stream's latency is
    far inside the objective; k 5 settles in 3.5 streams (the arrivals' prefill, 7 to 13 % of the engine's
    time, included)."""
    m, fit = ServiceModel(shape=SHAPE), fitted()
    c = choose(KS, m, Objectives(ttft_s=0.5, itl_s=0.1), EngineState((), 4), Demand(6.0, 96, 32), [0.0],
               latency=fit)
    assert [p.k for p in c.considered] == [8, 7, 6, 5] and c.k == 5
    for p in c.considered[:3]:
        assert not p.meets and p.itl_s < 0.08 and p.steady_rows > 0.9 * 4
    assert c.prediction.steady_rows < 0.9 * 4


def test_the_controller_chooses_k_from_the_fit_once_streams_have_finished():
    """The same arrival rate at dispatch: a controller whose streams measured 3x the engine's cost per row
    lowers k; one with no finished streams yet (the step model alone) keeps k 8."""
    ks = {}
    for learned in (False, True):
        clock = Clock()
        pb = controller(clock, 16, Objectives(ttft_s=0.5, itl_s=0.03))
        if learned:
            pb.latency = fitted()
        clock.t = 10.0
        for i in range(16):  # 8 requests/s over the last two seconds
            pb.arrived("balanced", clock.t - i / 8)
        ticket = pb.dispatcher.enter(0, 10.5, "balanced", prompt_tokens=96, max_tokens=32)
        ks[learned] = ticket.k
    assert ks[False] == 8 and ks[True] < 8


def test_the_fit_takes_the_operators_quantile():
    """--slo-quantile 0.5: the fit's ratio is the median of measured / fitted, not a fixed 90th percentile."""
    pb = controller(Clock(), 16, Objectives(ttft_s=0.5, itl_s=0.12, quantile=0.5))
    m, p90 = ServiceModel(shape=SHAPE), fitted(noise=0.4)
    for n, k, prefill, itl in p90.samples:
        pb.latency.observe(n, k, prefill, itl)
    pb.latency.fit(m)
    p90.fit(m)
    assert pb.latency.quantile == 0.5 and 0.9 < pb.latency.quantile_ratio < p90.quantile_ratio - 0.1


def test_the_fit_divides_out_the_arrivals_prefill_and_the_choice_puts_it_back():
    """Streams stalled by the prefills of the requests dispatched during their decode (a share P of the
    time, 0 to 0.6) measure the line / (1 - P): the fit recovers the line exactly, and a stream at P 0.5
    is predicted at twice it. Through the choice, the same engine and arrival rate with a loose TTFT
    objective: 1000-token prompts (k 8's prefills 44 % of the engine's time) lower k below 8 where
    10-token ones keep it, under an inter-token objective between the two predictions."""
    rng = random.Random(2)
    m, fit = ServiceModel(shape=SHAPE), StreamLatency()
    for _ in range(200):
        rows, k, prefill = rng.uniform(1, 16), rng.choice([2, 5, 8]), rng.uniform(0.0, 0.6)
        fit.observe(rows, rows * k, prefill, streams_line(rows, rows * k) / (1 - prefill))
    fit.fit(m)
    assert (fit.base_s, fit.per_cost, fit.quantile_ratio) == pytest.approx((0.007, 3.0, 1.0))
    assert fit.mean_s(m, 4, 32, 0.5) == pytest.approx(2 * streams_line(4, 32))
    state, long, short = EngineState((8, 8), 16), Demand(2.0, 1000, 32), Demand(2.0, 10, 32)
    assert 2.0 * 1000 * m.token_s(8) == pytest.approx(0.44)
    stalled = predict(8, m, state, long, [0.0], latency=fit).itl_s
    free = predict(8, m, state, short, [0.0], latency=fit).itl_s
    assert stalled > 1.5 * free
    objectives = Objectives(ttft_s=5.0, itl_s=(stalled + free) / 2 / 0.8)
    assert choose(KS, m, objectives, state, short, [0.0], latency=fit).k == 8
    assert choose(KS, m, objectives, state, long, [0.0], latency=fit).k < 8


def test_the_arrivals_prefill_over_a_life_is_taken_at_a_quantile_of_their_count():
    """The fit's quantile is of streams given the arrivals they saw; at binding, the arrivals over the life
    are still a Poisson draw. The same fit, engine and measured rate (2 req/s of 500-token prompts): at
    arrival quantile 0 (their mean, the default) k 8 meets a 25 ms inter-token objective; at 0.9 (4 arrivals
    over this 0.89 s life, where the mean is 1.8) the prediction is over it and k is lower. Without an
    inter-token objective the life is unbounded and the mean is all there is."""
    m, fit = ServiceModel(shape=SHAPE), fitted()
    state, demand = EngineState((8, 8), 16), Demand(2.0, 500, 32)
    objectives = Objectives(ttft_s=5.0, itl_s=0.025)
    at_mean = predict(8, m, state, demand, [0.0], latency=fit, itl_limit_s=0.025, arrival_quantile=0.0)
    at_quantile = predict(8, m, state, demand, [0.0], latency=fit, itl_limit_s=0.025, arrival_quantile=0.9)
    assert at_mean.itl_s <= 0.025 < at_quantile.itl_s
    assert choose(KS, m, objectives, state, demand, [0.0], latency=fit, arrival_quantile=0.0).k == 8
    assert choose(KS, m, objectives, state, demand, [0.0], latency=fit, arrival_quantile=0.9).k < 8
    assert choose(KS, m, objectives, state, demand, [0.0], latency=fit).k == 8  # the default: the mean
    unbounded = predict(8, m, state, demand, [0.0], latency=fit, arrival_quantile=0.9).itl_s
    assert unbounded == at_mean.itl_s  # no inter-token objective: the mean
    # An empty engine under a load that settles at about ten streams: the steady state is the bound, its rows
    # are the long run's (the mean rate), and the arrivals over the life stall its streams too.
    mean, upper = (predict(8, m, EngineState((), 16), Demand(4.0, 500, 32), [0.0], latency=fit, itl_limit_s=0.025,
                           arrival_quantile=q) for q in (0.0, 0.9))
    assert upper.steady_rows == mean.steady_rows > 9 and upper.itl_s > 1.5 * mean.itl_s


def test_the_controller_binds_k_at_the_operators_arrival_quantile():
    """Through the dispatch queue, the same fit, arrivals (2 req/s) and 500-token request: a controller at
    --brownout-arrival-quantile 0 (the default) binds k 8 under a 25 ms inter-token objective, one at 0.9 a
    lower k."""
    ks = {}
    for q in (PredictiveSettings().arrival_quantile, 0.9):
        clock = Clock()
        pb = controller(clock, 16, Objectives(ttft_s=5.0, itl_s=0.025), PredictiveSettings(arrival_quantile=q))
        pb.latency = fitted()
        clock.t = 10.0
        for i in range(4):
            pb.arrived("balanced", clock.t - i / 2)
        ks[q] = pb.dispatcher.enter(0, 15.0, "balanced", prompt_tokens=500, max_tokens=32).k
    assert ks[0.0] == 8 and ks[0.9] < 8
