"""The demo's chest drains: most on positive images, a few on negative ones, drawn on the lesion's side and
recorded per image."""

import numpy as np
import pandas as pd

from pneumoseg.demo import phantom
from pneumoseg.demo.phantom import CasePlan


def test_drains_follow_the_label():
    plans = phantom.plan_cases(400, 0.25, np.random.default_rng(0))
    positive = np.array([p.n_instances > 0 for p in plans])
    drain = np.array([p.drain for p in plans])
    assert drain[positive].sum() == round(100 * phantom.DRAIN_RATE_POSITIVE)
    assert drain[~positive].sum() == round(300 * phantom.DRAIN_RATE_NEGATIVE)
    assert {p.n_instances for p in plans if p.drain and p.n_instances} == {1, 2, 3}


def test_a_drain_is_drawn_on_the_lesion_side_and_changes_nothing_else():
    for index in range(4):
        with_drain = phantom.make_phantom(phantom.case_streams(3, 0, index)[0], 128, CasePlan(1, drain=True))
        without = phantom.make_phantom(phantom.case_streams(3, 0, index)[0], 128, CasePlan(1))
        assert without.drain is None
        assert all((a == b).all() for a, b in zip(with_drain.instances, without.instances))
        lesion_left = np.nonzero(with_drain.mask)[1].mean() < 64
        tip = with_drain.drain[-1]
        assert (tip[0] < 0.5) == lesion_left
        image = phantom.render(with_drain, phantom.case_streams(3, 0, index)[1])
        plain = phantom.render(without, phantom.case_streams(3, 0, index)[1])
        assert (image.astype(int) - plain).max() > 20  # a bright tube


def test_stage_00_records_the_drains(tiny_cfg):
    from pneumoseg.stages import demo_data

    cfg = tiny_cfg("demo.n_train=20", "demo.n_test=4", "demo.image_size=64", "demo.positive_rate=0.5")
    demo_data.run(cfg)
    table = pd.read_csv(f"{cfg.paths.input_dir}/{demo_data.ANNOTATIONS}", dtype={"ImageId": str})
    # 60% of the 10 train and of the 2 test positives; 5% of the 10 and 2 negatives rounds to none.
    assert list(table.columns) == ["ImageId", "drain"] and table["drain"].sum() == 6 + 1
    assert len(table) == 24
