"""Live signal sources against a real loopback HTTP server speaking WattTime v3 and
Electricity Maps v3 (tests/provider_server.py): values and forecasts, token lifetime, 401,
429 + Retry-After, 5xx, timeouts, unusable answers, gaps, and the recorded files. The wall
clock of the HTTP client is a FakeTimer the test advances (sleeps return at once and are
logged), so backoffs and Retry-After are checked exactly without waiting for them."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from provider_server import ProviderServer

from pilot.config.sites import ConfigError, parse_sites
from pilot.energy.forecast import compose
from pilot.energy.sources.base import AuthError, Cancelled, SourceError
from pilot.energy.sources.credentials import require, secret
from pilot.energy.sources.emaps import ElectricityMaps
from pilot.energy.sources.http import RateLimit, retry_after_s
from pilot.energy.sources.live import LiveSource
from pilot.energy.sources.record import SignalRecord
from pilot.energy.sources.watttime import TOKEN_RENEW_S, WattTime
from pilot.energy.traces import load_trace, parse_time

T0 = parse_time("2024-06-01T00:00:00Z")
CA, DE = "CAISO_NORTH", "DE"
FORECAST = "/v3/forecast"
LATEST = "/v3/carbon-intensity/latest"


class FakeTimer:
    """Wall time the test controls; the simulated clock follows it (speed-up 1). The test's
    thread sleeps without waiting; a started source's background poller is parked until
    ``cancel``, so the test alone drives the polls."""

    def __init__(self):
        self.t = 0.0
        self.sleeps: list[float] = []
        self.owner = threading.current_thread()
        self.cancelled = threading.Event()

    def monotonic(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        if threading.current_thread() is not self.owner:
            self.cancelled.wait()
        if self.cancelled.is_set():
            raise Cancelled()
        if s > 0:
            self.sleeps.append(round(s, 6))
            self.t += s

    def cancel(self) -> None:
        self.cancelled.set()

    def now(self) -> float:
        return T0 + self.t


def grid(values, step=300.0, start=T0):
    return [(start + i * step, float(v)) for i, v in enumerate(values)]


@pytest.fixture
def timer():
    return FakeTimer()


@pytest.fixture
def server(timer):
    ca = [300, 250, 90, 80, 70, 60, 200, 210, 220, 230, 240, 250, 260, 270, 280, 290]
    data = {CA: grid(ca), DE: grid([400, 380, 60, 50], step=3600.0)}
    with ProviderServer(data, timer.now, forecast_points=14) as s:
        yield s


def wt(server, timer, **http):
    opts = {"retries": 2, "backoff_s": 1.0, "timeout_s": 2.0, **http}
    return WattTime(server.username, server.password, timer, base_url=server.url, **opts)


def em(server, timer, token=None):
    return ElectricityMaps(token or server.em_token, timer, base_url=server.url, retries=1)


def live(provider, timer, regions, **kw):
    return LiveSource(provider, regions, timer, horizon_s=3600.0, now=timer.now, **kw)


def at(timer, seconds):
    timer.t = seconds


# -- WattTime -----------------------------------------------------------------------------------


def test_watttime_reading_is_the_current_moer_in_g_per_kwh_with_its_forecast(server, timer):
    src = live(wt(server, timer), timer, [CA])
    at(timer, 400)  # inside the 00:05 interval
    src.start()
    r = src.reading(CA, timer.now())
    assert r.time == T0 + 300 and r.mci == pytest.approx(250.0)  # lbs/MWh served, g/kWh read
    assert server.served == [("watttime", CA, T0 + 300, 250.0)]
    now = timer.now()
    assert r.forecast[0] == (now, r.mci)  # the measured present, then the provider's points
    assert [t for t, _ in r.forecast[1:-1]] == [T0 + 300 * k for k in range(2, 14)]
    assert r.forecast[1][1] == pytest.approx(90.0) and r.forecast[-1][0] == now + 3600
    src.close()


def test_token_is_reused_then_renewed_before_its_30_minutes_run_out(server, timer):
    src = live(wt(server, timer), timer, [CA])
    src.poll_region(CA)
    for _ in range(4):  # 24 minutes of polls on one token
        timer.t += 360
        src.poll_region(CA)
    assert server.logins == 1
    timer.t = TOKEN_RENEW_S  # renewed ahead of expiry, not after a failed request
    src.poll_region(CA)
    assert server.logins == 2 and server.requests.count(FORECAST) == 6
    assert src.reading(CA, timer.now()) is not None


def test_a_401_logs_in_again_and_retries_once(server, timer):
    src = live(wt(server, timer), timer, [CA])
    src.poll_region(CA)
    server.revoke_tokens()  # expired or revoked on the server's side
    timer.t += 300
    src.poll_region(CA)
    assert server.requests[-3:] == [FORECAST, "/login", FORECAST] and server.logins == 2
    assert src.reading(CA, timer.now()).time == T0 + 300


def test_429_waits_out_retry_after_then_succeeds(server, timer):
    src = live(wt(server, timer), timer, [CA])
    src.poll_region(CA)
    server.fail(FORECAST, status=429, headers={"Retry-After": "7"})
    timer.sleeps.clear()
    src.poll_region(CA)
    assert timer.sleeps == [7.0] and src.reading(CA, timer.now()) is not None


def test_429_on_the_last_try_holds_back_every_later_request(server, timer, caplog):
    src = live(wt(server, timer, retries=0), timer, [CA, "SPP_TX"])
    server.data["SPP_TX"] = grid([500] * 4)
    src.poll_region(CA)
    server.fail(FORECAST, status=429, headers={"Retry-After": "20"})
    timer.sleeps.clear()
    src.poll_region(CA)  # gives up: CA stale
    assert src.reading(CA, timer.now()) is None and "429" in src.stale_reason(CA)
    src.poll_region("SPP_TX")  # another region, same account: waits the 20 s first
    assert timer.sleeps == [20.0] and src.reading("SPP_TX", timer.now()) is not None


def test_retry_after_is_read_as_seconds_or_an_http_date():
    assert retry_after_s("7", 0.0) == 7.0
    assert retry_after_s("Sat, 01 Jun 2024 00:01:00 GMT", T0) == 60.0
    assert retry_after_s("soon", 0.0) is None and retry_after_s(None, 0.0) is None


def test_5xx_retries_with_backoff_then_the_region_goes_stale_until_it_answers(server, timer):
    src = live(wt(server, timer), timer, [CA])
    src.poll_region(CA)
    assert src.reading(CA, timer.now()) is not None
    server.fail(FORECAST, status=503, times=3)
    timer.sleeps.clear()
    src.poll_region(CA)
    assert timer.sleeps == [1.0, 2.0]  # exponential backoff between the 3 tries
    assert src.reading(CA, timer.now()) is None  # stale at once, though the old value is young
    assert "HTTP 503" in src.stale_reason(CA)
    src.poll_region(CA)
    assert src.reading(CA, timer.now()) is not None


def test_timeouts_are_retried_then_make_the_region_stale(server, timer):
    src = live(wt(server, timer, retries=1, timeout_s=0.3), timer, [CA])
    src.poll_region(CA)
    server.fail(FORECAST, status=200, delay_s=1.0)  # slower than the client waits
    timer.sleeps.clear()
    src.poll_region(CA)
    assert timer.sleeps == [1.0] and src.reading(CA, timer.now()) is not None
    server.fail(FORECAST, status=200, delay_s=1.0, times=2)
    src.poll_region(CA)
    assert src.reading(CA, timer.now()) is None and "timed out" in src.stale_reason(CA)


NAIVE, DUP = "2024-06-01T00:15:00", "2024-06-01T00:15:00+00:00"


@pytest.mark.parametrize(
    "change, message",
    [
        ('{"data": [{"point_time": "2024-06-01T00:15', "malformed JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        (lambda b: b.pop("meta"), "field 'meta' missing"),
        (lambda b: b["data"][0].pop("value"), "field 'value' missing"),
        (lambda b: b["meta"].update(units="kg_co2_per_mwh"), "units"),
        (lambda b: b["meta"].update(region="SPP_TX"), "answer is for region 'SPP_TX'"),
        (lambda b: b.update(data=[]), "no data points"),
        (lambda b: b["data"][0].update(point_time=NAIVE), "no UTC offset"),
        (lambda b: b["data"][0].update(value=-5), "not an intensity"),
        (lambda b: b["data"][1].update(point_time=DUP), "duplicate timestamp"),
    ],
    ids=[
        "truncated",
        "not-object",
        "no-meta",
        "no-value",
        "units",
        "other-region",
        "empty",
        "naive-time",
        "negative",
        "duplicate-in-series",
    ],  # fmt: skip
)
def test_unusable_answers_are_logged_and_skipped(server, timer, caplog, change, message):
    src = live(wt(server, timer), timer, [CA])
    at(timer, 700)
    src.poll_region(CA)
    before = src.reading(CA, timer.now())
    if not isinstance(change, str):  # spoil the next documented answer
        body = server.watttime_body(CA, T0 + 900)
        change(body)
        change = json.dumps(body)
    server.fail(FORECAST, status=200, body=change)
    at(timer, 950)
    with caplog.at_level(logging.ERROR, logger="pilot.energy.sources"):
        src.poll_region(CA)
    assert message in caplog.text and "value skipped" in caplog.text
    assert src.reading(CA, timer.now()).time == before.time  # the last good value stands


def test_a_region_the_provider_does_not_know_is_logged_and_stays_stale(server, timer, caplog):
    src = live(wt(server, timer), timer, [CA, "NOWHERE"])
    with caplog.at_level(logging.ERROR, logger="pilot.energy.sources"):
        src.start()
    assert "NOWHERE" in caplog.text and "HTTP 400" in caplog.text
    assert src.reading("NOWHERE", timer.now()) is None and src.reading(CA, timer.now())
    src.close()


def test_out_of_order_and_conflicting_timestamps_are_skipped_repeats_are_quiet(
    server, timer, caplog
):
    src = live(wt(server, timer), timer, [CA])
    at(timer, 700)
    src.poll_region(CA)  # 00:10
    older = json.dumps(server.watttime_body(CA, T0 + 300))
    conflicting = server.watttime_body(CA, T0 + 600)
    conflicting["data"][0]["value"] += 10.0
    server.fail(FORECAST, status=200, body=older)
    server.fail(FORECAST, status=200, body=json.dumps(conflicting))
    with caplog.at_level(logging.ERROR, logger="pilot.energy.sources"):
        src.poll_region(CA)
        src.poll_region(CA)
        assert "out-of-order" in caplog.text and "duplicate timestamp" in caplog.text
        caplog.clear()
        src.poll_region(CA)  # the same 00:10 point again: no news, no error
    assert caplog.text == ""
    r = src.reading(CA, timer.now())
    assert r.time == T0 + 600 and r.mci == pytest.approx(90.0)


def test_a_gap_in_the_data_ages_into_stale_and_recovers(server, timer):
    del server.data[CA][3:12]  # nothing between 00:10 and 01:00
    src = live(wt(server, timer), timer, [CA])
    at(timer, 700)
    src.poll_region(CA)
    at(timer, 600 + 900)  # the 00:10 value is 15 min old: still fresh
    src.poll_region(CA)
    assert src.reading(CA, timer.now()).time == T0 + 600
    at(timer, 600 + 901)
    src.poll_region(CA)
    assert src.reading(CA, timer.now()) is None and "older than 900" in src.stale_reason(CA)
    at(timer, 3600)
    src.poll_region(CA)
    assert src.reading(CA, timer.now()).time == T0 + 3600


def test_a_wrong_password_fails_start_with_a_clear_error(server, timer):
    src = live(WattTime("alice", "wrong", timer, base_url=server.url), timer, [CA])
    with pytest.raises(AuthError, match="WATTTIME_USERNAME and WATTTIME_PASSWORD") as e:
        src.start()
    assert "wrong" not in str(e.value) and "alice" not in str(e.value)


def test_the_client_stays_under_the_published_rate_limits(server, timer):
    limit = RateLimit(3, 10.0)
    for _ in range(3):
        limit.acquire(timer)
    assert timer.sleeps == []
    timer.t += 4.0
    limit.acquire(timer)  # a 4th within the window waits for the first to leave it
    assert timer.sleeps == [6.0]
    w, e = wt(server, timer), em(server, timer)
    assert (w.http.limit.count, w.http.limit.window_s) == (3000, 300.0)  # docs.watttime.org
    assert (w.login_limit.count, w.login_limit.window_s) == (100, 300.0)
    assert e.http.limit.count / e.http.limit.window_s <= 1.0


# -- Electricity Maps ---------------------------------------------------------------------------


def test_electricitymaps_latest_and_forecast_with_the_auth_token_header(server, timer):
    src = live(em(server, timer), timer, [DE])
    at(timer, 1800)
    src.start()
    r, now = src.reading(DE, timer.now()), timer.now()
    assert (r.time, r.mci) == (T0, 400.0)  # hourly zone: the 00:00 value at 00:30
    # present, the 01:00 point inside the horizon, the end interpolated towards 02:00
    assert r.forecast == [(now, 400.0), (T0 + 3600, 380.0), (now + 3600, pytest.approx(220.0))]
    assert server.requests == [LATEST, "/v3/carbon-intensity/forecast"]
    src.close()


def test_electricitymaps_without_forecast_access_publishes_persistence(timer, caplog):
    with ProviderServer({DE: grid([400, 380], step=3600.0)}, timer.now, em_forecast=False) as s:
        src = live(em(s, timer), timer, [DE])
        with caplog.at_level(logging.WARNING, logger="pilot.energy.sources"):
            src.start()
            src.poll_region(DE)
        now = timer.now()
        assert src.reading(DE, now).forecast == [(now, 400.0), (now + 3600, 400.0)]
        assert caplog.text.count("no forecast access") == 1  # asked once, then not again
        assert s.requests.count("/v3/carbon-intensity/forecast") == 1
        src.close()


def test_electricitymaps_rejected_token_fails_start(server, timer):
    src = live(em(server, timer, token="not-the-token"), timer, [DE])
    with pytest.raises(AuthError, match="ELECTRICITYMAPS_TOKEN") as e:
        src.start()
    assert "not-the-token" not in str(e.value)


# -- pieces -------------------------------------------------------------------------------------


def test_published_forecast_is_the_present_then_the_providers_points_or_persistence():
    series = [(0.0, 50.0), (600.0, 80.0), (1200.0, 200.0)]
    assert compose(100.0, 55.0, series, 900.0) == [(100.0, 55.0), (600.0, 80.0), (1000.0, 160.0)]
    assert compose(100.0, 55.0, series, 3600.0) == [(100.0, 55.0), (600.0, 80.0), (1200.0, 200.0)]
    assert compose(1300.0, 55.0, series, 900.0) == [(1300.0, 55.0), (2200.0, 55.0)]


def test_credentials_come_from_the_environment_or_a_secret_file_only(tmp_path):
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    assert secret("WATTTIME_PASSWORD", {"WATTTIME_PASSWORD": "direct"}) == "direct"
    assert secret("WATTTIME_PASSWORD", {"WATTTIME_PASSWORD_FILE": str(f)}) == "s3cret"
    with pytest.raises(SourceError, match="WATTTIME_USERNAME and WATTTIME_PASSWORD"):
        require(["WATTTIME_USERNAME", "WATTTIME_PASSWORD"], "WattTime", {})
    with pytest.raises(SourceError, match="cannot read"):
        secret("X", {"X_FILE": str(tmp_path / "missing")})
    site = {"name": "a", "region": CA, "gpus": 0, "train_kw": 1.0, "idle_kw": 0.1}
    site |= {"provision_delay_s": 0, "source": "watttime"}
    assert parse_sites({"sites": [site]}).sites[0].source == "watttime"
    with pytest.raises(ConfigError, match="unknown key"):  # no place for a password in config
        parse_sites({"sites": [{**site, "password": "x"}]})
    with pytest.raises(ConfigError, match="source"):
        parse_sites({"sites": [{**site, "source": "carbonapi"}]})


def test_record_appends_observations_forecasts_and_a_replayable_trace(server, timer, tmp_path):
    rec = SignalRecord(tmp_path, [CA, DE], start=T0)
    src = live(wt(server, timer), timer, [CA], record=rec)
    for k in range(3):
        at(timer, 300 * k + 10)
        src.poll_region(CA)
        src.poll_region(CA)  # the same point twice: recorded once
        rec.tick(timer.now(), {CA: src.reading(CA, timer.now()).mci, DE: None if k == 1 else 5.0})
    rec.close()
    obs = (tmp_path / "observations.csv").read_text().splitlines()
    assert obs[0] == "received_at,source,region,point_time,mci" and len(obs) == 4
    served = [(t, v) for _, _, t, v in server.served]
    assert [(parse_time(r.split(",")[3]), float(r.split(",")[4])) for r in obs[1:]] == [
        (t, pytest.approx(v)) for t, v in dict(served).items()
    ]
    fcs = (tmp_path / "forecasts.csv").read_text().splitlines()
    issued = [server.watttime_body(CA, T0 + 300 * k + 10)["data"] for k in range(3)]
    assert len(fcs) == 1 + sum(map(len, issued))  # each issue once, every point
    trace = load_trace(tmp_path / "trace.csv")  # the stale DE cell is a short gap: filled
    assert trace.regions == [CA, DE] and trace.at(CA, T0 + 310) == pytest.approx(250.0)
    with pytest.raises(SourceError, match="already records up to"):
        SignalRecord(tmp_path, [CA, DE], start=T0 + 310)
    with pytest.raises(SourceError, match="records columns"):
        SignalRecord(tmp_path, [CA], start=T0 + 3600)
    SignalRecord(tmp_path, [CA, DE], start=T0 + 3600).close()  # a resumed run appends


def test_no_credential_reaches_logs_errors_or_records(server, timer, tmp_path, caplog):
    rec = SignalRecord(tmp_path, [CA, DE], start=T0)
    wsrc = live(wt(server, timer), timer, [CA], record=rec)
    esrc = live(em(server, timer), timer, [DE], record=rec)
    errors = []
    with caplog.at_level(logging.DEBUG):
        wsrc.start()
        esrc.start()
        server.revoke_tokens()
        server.fail(FORECAST, status=429, headers={"Retry-After": "1"})
        server.fail(FORECAST, status=500, times=5)
        server.fail(LATEST, status=200, body='{"zone": "DE", "carbonIntensity": ')
        for src, region in ((wsrc, CA), (esrc, DE)):
            for _ in range(3):
                src.poll_region(region)
        for bad in (WattTime("alice", server.password + "x", timer, base_url=server.url),
                    ElectricityMaps(server.em_token + "x", timer, base_url=server.url)):  # fmt: skip
            try:
                live(bad, timer, [CA if isinstance(bad, WattTime) else DE]).start()
            except AuthError as e:
                errors.append(str(e))
    wsrc.close()
    esrc.close()
    rec.close()
    assert len(errors) == 2 and server.logins >= 2
    text = caplog.text + "".join(errors)
    text += "".join(p.read_text() for p in tmp_path.iterdir())
    for s in server.credentials():
        assert s not in text


def test_sites_config_names_the_recorded_forecasts_relative_to_its_file(tmp_path):
    site = {"name": "a", "region": CA, "gpus": 0, "train_kw": 1.0, "idle_kw": 0.1}
    site["provision_delay_s"] = 0
    policy = {"forecaster": "recorded", "forecasts": "rec/forecasts.csv"}
    cfg = parse_sites({"policy": policy, "sites": [site]}, base=tmp_path)
    assert cfg.forecaster == "recorded" and cfg.forecasts == tmp_path / "rec" / "forecasts.csv"
    with pytest.raises(ConfigError, match="policy.forecasts: must be a path string"):
        parse_sites({"policy": {"forecasts": 3}, "sites": [site]})


def test_recorded_forecasts_read_back_issue_by_issue(tmp_path):
    from pilot.energy.sources.record import read_forecasts

    rec = SignalRecord(tmp_path, [CA], start=T0)
    rec.forecast("watttime", CA, T0, [(T0, 300.0), (T0 + 300, 50.0)])
    rec.forecast("watttime", CA, T0 + 300, [(T0 + 300, 60.0), (T0 + 600, 70.5)])
    rec.forecast("watttime", CA, T0 + 300, [(T0 + 300, 61.0)])  # re-recorded on resume: replaces
    rec.close()
    fc = read_forecasts(tmp_path / "forecasts.csv")
    assert fc.issued == {CA: [T0, T0 + 300]}
    assert fc.series[CA] == [[(T0, 300.0), (T0 + 300, 50.0)], [(T0 + 300, 61.0)]]


@pytest.mark.parametrize(
    "body,message",
    [
        (None, "cannot read it"),
        ("", "expected the header"),
        ("issued_at,region,point_time,mci\n", "expected the header"),
        ("{h}\n2024-06-01T00:00:00+00:00,watttime,CA\n", "line 2: 3 columns, expected 5"),
        ("{h}\n2024-06-01T00:00:00,watttime,CA,2024-06-01T00:00:00Z,1\n", "no UTC offset"),
        ("{h}\n2024-06-01T00:00:00Z,watttime,CA,2024-06-01T00:00:00Z,x\n", "line 2: could not"),
        (
            "{h}\n2024-06-01T00:00:00Z,w,CA,2024-06-01T00:05:00Z,1\n"
            "2024-06-01T00:00:00Z,w,CA,2024-06-01T00:10:00Z,2\n"
            "2024-06-01T00:00:00Z,w,CA,2024-06-01T00:07:00Z,3\n",
            "line 4: point_time 2024-06-01T00:07:00Z not after",
        ),
    ],
)
def test_a_missing_or_malformed_forecasts_file_is_one_clear_error(tmp_path, body, message):
    from pilot.energy.sources.record import FORECAST_COLUMNS, read_forecasts

    path = tmp_path / "forecasts.csv"
    if body is not None:
        path.write_text(body.format(h=",".join(FORECAST_COLUMNS)))
    with pytest.raises(SourceError, match=message) as err:
        read_forecasts(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
