"""The statistics of tram_dist.compare against textbook values (no scipy)."""
import math

import pytest

from tram_dist.compare import betainc, mean_std, paired_t_test, t_cdf, t_sf

# Student's (1908) sleep data as in R's `sleep`: extra hours of sleep of 10 patients under two
# drugs. R: t.test(extra ~ group, data = sleep, paired = TRUE) gives t = -4.0621, df = 9,
# p-value = 0.002833, mean difference -1.58.
DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_mean_std_sample():
    m, s = mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert m == 5 and s == pytest.approx(math.sqrt(32 / 7))
    assert mean_std([3.5]) == (3.5, None)
    assert mean_std([]) == (None, None)


def test_betainc_identities():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x)
        assert betainc(3, 1, x) == pytest.approx(x ** 3)
    for a, b, x in ((0.5, 2.5, 0.3), (4.5, 0.5, 0.8), (10, 3, 0.6)):
        assert betainc(a, b, x) == pytest.approx(1 - betainc(b, a, 1 - x), abs=1e-12)
    with pytest.raises(ValueError):
        betainc(0, 1, 0.5)


def test_t_distribution_closed_forms_and_table():
    for t in (-3.0, -0.4, 0.0, 0.7, 2.0, 12.0):
        assert t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        assert t_cdf(t, 7) + t_sf(t, 7) == pytest.approx(1.0)
    # two-sided critical values from the t table
    assert 2 * t_sf(2.228139, 10) == pytest.approx(0.05, abs=1e-6)
    assert 2 * t_sf(4.032143, 5) == pytest.approx(0.01, abs=1e-6)
    assert 2 * t_sf(12.706205, 1) == pytest.approx(0.05, abs=1e-6)
    assert t_sf(1.959964, 1e7) == pytest.approx(0.025, abs=1e-6)  # -> normal
    assert t_sf(math.inf, 3) == 0.0 and t_sf(-math.inf, 3) == 1.0


def test_paired_t_test_student_sleep_data():
    r = paired_t_test(DRUG1, DRUG2)
    assert r["n"] == 10 and r["df"] == 9
    assert r["mean_diff"] == pytest.approx(-1.58)
    assert r["t"] == pytest.approx(-4.0621, abs=1e-4)
    assert r["p"] == pytest.approx(0.002833, abs=1e-6)
    # by hand: differences d, t = mean(d) / (sd(d) / sqrt(n))
    d = [a - b for a, b in zip(DRUG1, DRUG2)]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    assert r["std_diff"] == pytest.approx(sd)
    assert r["t"] == pytest.approx(m / (sd / math.sqrt(len(d))))
    assert paired_t_test(DRUG2, DRUG1)["p"] == pytest.approx(r["p"])  # symmetric, two-sided


def test_paired_t_test_edge_cases():
    one = paired_t_test([1.0], [2.0])
    assert one["n"] == 1 and one["mean_diff"] == -1.0 and one["p"] is None and one["t"] is None
    assert paired_t_test([], [])["p"] is None
    same = paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["p"] == 1.0 and same["t"] == 0.0
    shift = paired_t_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every difference exactly 1
    assert shift["p"] == 0.0 and shift["t"] == math.inf
    with pytest.raises(ValueError):
        paired_t_test([1.0, 2.0], [1.0])
