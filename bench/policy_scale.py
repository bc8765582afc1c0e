"""Policy + MCI interpolation at scale: N sites x D days of 5-minute data, streamed in chunks.

Per chunk (default two days): synthesise an MCI trace for every site (excluded from the
timing: it stands in for reading data), interpolate it at the ticks, build the forecast
outlooks, and run the batch policy (pilot.control.batch.simulate_batch) carrying state across chunks.
Each size runs in its own process so its peak RSS is its own. Scaling: the same work at
several sizes; time per site-tick should stay flat (linear in sites x steps).

    python bench/policy_scale.py                     # 1000 sites x 365 days (+ smaller sizes)
    python bench/policy_scale.py --sites 100 --days 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from pilot.control import policy as P
from pilot.control.batch import simulate_batch
from pilot.control.outlook import forecast_arrays
from pilot.energy import forecast as F
from pilot.energy import traces as T
from pilot.energy.synthetic import synthetic

DAY_S = 86400.0


def machine_speed_us() -> float:
    """Wall time of one small numpy op (1000 floats): a yardstick for how busy the machine
    is, so figures from a shared machine can be compared (about 1 us when idle)."""
    x = np.random.default_rng(0).random(1000)
    t = time.perf_counter()
    for _ in range(2000):
        x < 0.5  # noqa: B015
    return (time.perf_counter() - t) / 2000 * 1e6


def run_one(
    sites: int, days: float, tick_s: float, chunk_days: float, name: str, forecaster: str
) -> dict:
    calib = machine_speed_us()
    regions = [f"R{i:04d}" for i in range(sites)]
    rng = np.random.default_rng(0)
    offsets = dict(zip(regions, rng.uniform(-10, 12, sites).round(1).tolist(), strict=True))
    cfg = P.PolicyConfig(name=name, **P.PRESETS[name])
    delays = rng.choice([60.0, 240.0, 600.0], sites)
    idle_kw, train_kw = np.full(sites, 0.468), np.full(sites, 2.024)
    start = T.DAY_S * 19876  # 2024-06-01 UTC
    state = None
    t_policy = t_interp = t_fc = 0.0
    site_ticks = trained = 0
    n_chunks = int(np.ceil(days / chunk_days))
    for c in range(n_chunks):
        c0 = start + c * chunk_days * DAY_S
        c_days = min(chunk_days, days - c * chunk_days)
        # the trace covers the chunk plus the forecast horizon (and a day back for
        # same_time_yesterday)
        back = DAY_S if forecaster == "same_time_yesterday" else 0.0
        hours = (c_days * DAY_S + cfg.horizon_s + back) / 3600
        trace = synthetic(
            regions, hours, seed=c, start=c0 - back, step_s=300.0, utc_offsets=offsets
        )
        ticks = c0 + np.arange(0.0, c_days * DAY_S, tick_s)
        t = time.perf_counter()
        mci = trace.series_all(ticks)
        t_interp += time.perf_counter() - t
        t = time.perf_counter()
        fc = None
        if cfg.use_forecast:
            fc = forecast_arrays(
                F.make_forecaster(forecaster, trace),
                trace,
                regions,
                ticks,
                cfg.horizon_s,
                cfg.threshold,
                cfg.release_delay_s,
                mci,
            )
        t_fc += time.perf_counter() - t
        t = time.perf_counter()
        res = simulate_batch(cfg, delays, ticks, mci, fc, state, idle_kw=idle_kw, train_kw=train_kw)
        t_policy += time.perf_counter() - t
        state = res.state
        site_ticks += mci.size
        trained += int(res.train.sum())
        del trace, mci, fc, res
    total = t_interp + t_fc + t_policy
    return {
        "sites": sites,
        "days": days,
        "site_ticks": site_ticks,
        "s_total": total,
        "s_interp": t_interp,
        "s_forecast": t_fc,
        "s_policy": t_policy,
        "ms_per_sim_day": 1000 * total / days,
        "ns_per_site_tick": 1e9 * total / site_ticks,
        "train_share": trained / site_ticks,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ufunc_us": calib,
        "loadavg": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--days", type=float, default=365.0)
    ap.add_argument("--tick", type=float, default=300.0, help="policy tick (s)")
    ap.add_argument("--chunk-days", type=float, default=2.0)
    ap.add_argument("--policy", default="forecast", choices=list(P.PRESETS))
    ap.add_argument("--forecaster", default="same_time_yesterday")
    ap.add_argument("--one", action="store_true", help="run one size, print JSON (internal)")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.sites, a.days, a.tick, a.chunk_days, a.policy, a.forecaster)))
        return
    # same total work split differently, then the full size: sites x4 and days x4
    sizes = [
        (a.sites // 4, a.days / 4),
        (a.sites, a.days / 4),
        (a.sites // 4, a.days),
        (a.sites, a.days),
    ]
    results = []
    for s, d in sizes:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            "--sites",
            str(s),
            "--days",
            str(d),
            "--tick",
            str(a.tick),
            "--chunk-days",
            str(a.chunk_days),
            "--policy",
            a.policy,
            "--forecaster",
            a.forecaster,
        ]
        r = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        results.append(r)
        print(
            f"{r['sites']:5d} sites x {r['days']:6.1f} d: {r['s_total']:7.2f} s "
            f"(interp {r['s_interp']:.2f}, forecast {r['s_forecast']:.2f}, policy {r['s_policy']:.2f})  "
            f"{r['ms_per_sim_day']:8.1f} ms/sim-day  {r['ns_per_site_tick']:6.1f} ns/site-tick  "
            f"peak {r['peak_rss_mb']:.0f} MB  trained {100 * r['train_share']:.1f}% of site-ticks  "
            f"(numpy op {r['ufunc_us']:.1f} us, load {r['loadavg']:.1f})",
            flush=True,
        )
    small, wide, long_, full = results
    # linear scaling: time ratio / work ratio (1.0 = linear; < 1 = better than linear)
    sites_ratio = (wide["s_total"] / small["s_total"]) / (wide["site_ticks"] / small["site_ticks"])
    days_ratio = (long_["s_total"] / small["s_total"]) / (long_["site_ticks"] / small["site_ticks"])
    full_ratio = (full["s_total"] / small["s_total"]) / (full["site_ticks"] / small["site_ticks"])
    print(
        f"scaling (time ratio / work ratio): sites x4 {sites_ratio:.2f}, days x4 {days_ratio:.2f}, both x16 {full_ratio:.2f}"
    )
    print(
        f"sites={full['sites']} days={full['days']:g} tick_s={a.tick:g} policy={a.policy} "
        f"forecaster={a.forecaster} total_s={full['s_total']:.2f} ms_per_sim_day={full['ms_per_sim_day']:.1f} "
        f"ns_per_site_tick={full['ns_per_site_tick']:.1f} peak_rss_mb={full['peak_rss_mb']:.0f} "
        f"scale_sites_x4={sites_ratio:.2f} scale_days_x4={days_ratio:.2f} scale_x16={full_ratio:.2f} "
        f"numpy_op_us={full['ufunc_us']:.2f} loadavg={full['loadavg']:.1f}"
    )


if __name__ == "__main__":
    main()
