"""studies/int8_walk.py: each stopping rule picks, from the ranking-photo columns alone, the k a hand reading of
the rows gives; the held-out columns never change a pick."""
import pytest


@pytest.fixture(scope="module")
def study(load_study):
    return load_study("int8_walk")


# k: share of MACs in int8, ranking SQNR (dB), ranking gate
WALK = [(1.00, 16.5, False), (0.99, 18.4, False), (0.96, 20.4, True), (0.95, 21.0, False), (0.92, 21.4, False),
        (0.91, 21.8, False), (0.90, 22.3, False), (0.87, 22.4, False), (0.79, 26.0, True)]


def rows(held_passed=True):
    return [{"k": k, "int8_mac_share": s, "ranking_sqnr_db": db, "ranking_passed": p, "heldout_passed": held_passed}
            for k, (s, db, p) in enumerate(WALK)]


@pytest.mark.parametrize("rule, wanted, k", [
    ("gate", 0, 2),  # first pass on the ranking photos
    ("gate", 3, 7),  # past the wanted nodes no pass before the floor (k=8 leaves 79%): the last allowed k
    ("step-0.5", 0, 3),  # 21.0 -> 21.4 adds 0.4 < 0.5
    ("step-0.25", 0, 6),  # 22.3 -> 22.4 adds 0.1
    ("step-1", 0, 2),  # 20.4 -> 21.0 adds 0.6 < 1
    ("step-1", 5, 5),  # the wanted nodes are floated whatever their step
    ("sqnr-22", 0, 6),
    ("sqnr-24", 0, 7),  # never reached above the floor: the last allowed k
])
def test_rules_pick_the_hand_read_k(study, rule, wanted, k):
    assert study.pick(rows(), rule, wanted) == k
    assert study.pick(rows(held_passed=False), rule, wanted) == k  # the held-out column is never read


def test_a_run_without_its_int8_report_gets_one_line_naming_the_file_and_the_export_command(study, tmp_path):
    with pytest.raises(SystemExit, match=r"model\.int8\.report\.json not found: export the run first with "
                                         r"`mineralnet-export .* --int8 --report`"):
        study.main([str(tmp_path)])
