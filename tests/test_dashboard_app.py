"""The dashboard's server side through Flask's and Flask-SocketIO's test clients (and one
real server): login, sessions, CSRF, the throttle, headers, /metrics, Socket.IO connection
checks, every control action for every role with its effect on a real coordinator, the audit
record of each, and per-client flow control of the state messages."""

from __future__ import annotations

import base64
import json
import operator
import re
import threading
import urllib.request

import pytest

pytest.importorskip("flask_socketio")

from argon2 import PasswordHasher
from prometheus_client.parser import text_string_to_metric_families
from socketio import packet

from _support import SAFETY
from tokengate import OperationsCoordinator, TokenState
from tokengate.dashboard import DashboardConfig, create_app, serve
from tokengate.dashboard.app import CSP, is_loopback
from tokengate.dashboard.controls import ACTIONS
from tokengate.errors import ConfigurationError

_fast = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)  # cheap valid argon2id
PASSWORDS = {"vera": "viewer-pw", "otto": "operator-pw", "ada": "admin-pw"}
ROLE_OF = {"vera": "viewer", "otto": "operator", "ada": "admin"}
USERS = {name: (ROLE_OF[name], _fast.hash(pw)) for name, pw in PASSWORDS.items()}
ORIGIN = "http://localhost"  # what Flask's test client uses as Host


class FakeClock:
    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, dt: float) -> None:
        with self._lock:
            self.now += dt


def dash_op(x: int = 0) -> int:
    return x


def launch_me(n: int, label: str = "x") -> str:
    """Makes a label.

    More text."""
    return f"{label}{n}"


@pytest.fixture
def coord(tmp_path):
    with OperationsCoordinator(
        cores=1, workers_per_core=2, quarantine_dir=tmp_path / "q", grow_on_demand=False
    ) as c:
        yield c


@pytest.fixture
def clock():
    return FakeClock()


def make_dash(coord, tmp_path, clock, **options):
    options.setdefault("users", USERS)
    options.setdefault("update_interval", 3600.0)  # the publisher idles: tests publish
    cfg = DashboardConfig.build(audit_log=tmp_path / "audit.jsonl", clock=clock, **options)
    app = create_app(coord, cfg)
    return app.extensions["tokengate_dashboard"]


@pytest.fixture
def dash(coord, tmp_path, clock):
    d = make_dash(coord, tmp_path, clock)
    yield d
    d.close()


def login(client, user, password=None):
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post(
        "/login",
        data={
            "username": user,
            "password": PASSWORDS.get(user, "x") if password is None else password,
            "csrf_token": token,
        },
    )


def page_csrf(client) -> str:
    page = client.get("/")
    assert page.status_code == 200
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text).group(1)


def logged_in(dash, user):
    client = dash.app.test_client()
    assert login(client, user).status_code == 303
    return client, page_csrf(client)


def connect(dash, client, csrf, origin=ORIGIN):
    headers = {} if origin is None else {"Origin": origin}
    return dash.socketio.test_client(
        dash.app, flask_test_client=client, auth={"csrf": csrf}, headers=headers
    )


def session_socket(dash, user):
    client, csrf = logged_in(dash, user)
    sc = connect(dash, client, csrf)
    assert sc.is_connected()
    sc.get_received()  # hello and the first state
    return sc, csrf


def control(sc, csrf, action, **params):
    return sc.emit("control", {"action": action, "csrf": csrf, **params}, callback=True)


def records(dash):
    return dash.audit.tail(10_000)


def states(sc):
    return [m["args"][0] for m in sc.get_received() if m["name"] == "state"]


def ack_states(dash, sc) -> int:
    """Acknowledges the state messages the test client got (it cannot itself)."""
    server = dash.socketio.server
    sid = server.manager.sid_from_eio_sid(sc.eio_sid, "/")
    ids = [i for i in list(server.manager.callbacks.get(sid, {})) if i != 0]
    for i in ids:
        pkt = packet.Packet(packet.ACK, data=[], namespace="/", id=i)
        server._handle_eio_message(sc.eio_sid, pkt.encode())
    return len(ids)


def cookie_header(resp, name):
    for value in resp.headers.getlist("Set-Cookie"):
        if value.startswith(name + "="):
            return value
    raise AssertionError(f"no {name} cookie in {resp.headers.getlist('Set-Cookie')}")


def quarantine_record(coord, op="qop"):
    return coord.guard_house.quarantine.add(
        7,
        op,
        operator.add,
        (1, 2),
        {},
        predicted=12.0,
        baseline=0.5,
        deviation=24.0,
        threshold=10.0,
        reason="predicted 12 s, 24x the baseline",
    )


# -- login ----------------------------------------------------------------------------------


def test_login_ok_sets_a_strict_session_cookie(dash):
    client = dash.app.test_client()
    page = client.get("/login")
    assert page.status_code == 200
    nonce = cookie_header(page, "tokengate_login")
    assert "HttpOnly" in nonce and "SameSite=Strict" in nonce
    resp = login(client, "ada")
    assert resp.status_code == 303 and resp.headers["Location"] == "/"
    cookie = cookie_header(resp, "tokengate_session")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Max-Age=28800" in cookie
    assert "Secure" not in cookie
    assert client.get("/").status_code == 200
    assert client.get("/login").status_code == 303  # already logged in
    last = records(dash)[-1]
    assert (last["action"], last["outcome"], last["user"], last["role"]) == (
        "login",
        "ok",
        "ada",
        "admin",
    )
    assert last["client"] == "127.0.0.1"


def test_the_session_cookie_is_secure_with_tls(coord, tmp_path, clock):
    d = make_dash(coord, tmp_path, clock, tls=True)
    try:
        resp = login(d.app.test_client(), "ada")
        assert "Secure" in cookie_header(resp, "tokengate_session")
        assert "Strict-Transport-Security" in resp.headers
    finally:
        d.close()


@pytest.mark.parametrize(("user", "password"), [("ada", "wrong"), ("nobody", "admin-pw")])
def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(dash, user, password):
    client = dash.app.test_client()
    resp = login(client, user, password)
    assert resp.status_code == 401
    assert "wrong user name or password" in resp.text
    assert "tokengate_session" not in "".join(resp.headers.getlist("Set-Cookie"))
    assert client.get("/").status_code == 303
    last = records(dash)[-1]
    assert (last["action"], last["outcome"], last["target"]) == ("login", "failed", user)
    assert last["user"] is None


def test_login_without_or_with_a_wrong_csrf_token_is_refused(dash):
    client = dash.app.test_client()
    client.get("/login")
    resp = client.post("/login", data={"username": "ada", "password": "admin-pw"})
    assert resp.status_code == 400 and "invalid or missing CSRF token" in resp.text
    resp = client.post(
        "/login", data={"username": "ada", "password": "admin-pw", "csrf_token": "0" * 64}
    )
    assert resp.status_code == 400
    # a token from another browser's nonce does not fit this one's cookie
    other = dash.app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', other.get("/login").text).group(1)
    resp = client.post(
        "/login", data={"username": "ada", "password": "admin-pw", "csrf_token": token}
    )
    assert resp.status_code == 400
    assert client.get("/").status_code == 303
    # Audited once a minute per address (anyone's page can post this form), and no lockout.
    refused = [r for r in records(dash) if r["action"] == "login"]
    assert [r["outcome"] for r in refused] == ["refused"]
    assert refused[0]["detail"].startswith("invalid or missing CSRF token")


def test_five_failures_lock_the_client_out_for_a_minute(dash, clock):
    client = dash.app.test_client()
    for _ in range(4):
        assert login(client, "ada", "wrong").status_code == 401
        clock.advance(5)
    assert login(client, "ada", "wrong").status_code == 401  # the fifth starts the lockout
    resp = login(client, "ada")  # even the right password, while locked
    assert resp.status_code == 429
    assert "too many failed logins, try again in 60 s" in resp.text
    clock.advance(30)
    resp = login(client, "ada")
    assert resp.status_code == 429 and "try again in 30 s" in resp.text
    lockouts = [r for r in records(dash) if r["action"] == "login_lockout"]
    assert len(lockouts) == 1 and lockouts[0]["client"] == "127.0.0.1"
    refused = [r for r in records(dash) if r["action"] == "login" and r["outcome"] == "refused"]
    assert len(refused) == 1  # refusals while locked: audited once per lockout
    clock.advance(30)
    assert login(client, "ada").status_code == 303
    assert len([r for r in records(dash) if r["action"] == "login_lockout"]) == 1


def test_an_expired_session_is_refused(dash, clock):
    client, _ = logged_in(dash, "otto")
    clock.advance(8 * 3600 - 1)
    assert client.get("/").status_code == 200
    clock.advance(1)
    resp = client.get("/")
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"
    assert client.get("/api/state").status_code == 401


def test_logout(dash):
    client, csrf = logged_in(dash, "otto")
    assert client.post("/logout", data={}).status_code == 400
    assert client.get("/").status_code == 200
    resp = client.post("/logout", data={"csrf_token": csrf})
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"
    assert client.get("/").status_code == 303
    kinds = [(r["action"], r["outcome"]) for r in records(dash) if r["action"] == "logout"]
    assert kinds == [("logout", "refused"), ("logout", "ok")]


def test_the_page_needs_a_session_and_carries_the_csrf_token_and_role(dash):
    client = dash.app.test_client()
    resp = client.get("/")
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"
    client, csrf = logged_in(dash, "vera")
    page = client.get("/").text
    assert '<meta name="tokengate-user" content="vera">' in page
    assert '<meta name="tokengate-role" content="viewer">' in page
    assert len(csrf) >= 32


def test_healthz_needs_no_login_and_says_little(tmp_path, clock):
    coord = OperationsCoordinator(cores=1, workers_per_core=1, quarantine_dir=tmp_path / "q")
    with coord:
        d = make_dash(coord, tmp_path, clock)
        try:
            client = d.app.test_client()
            resp = client.get("/healthz")
            assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}
        finally:
            pass
    try:
        resp = client.get("/healthz")
        assert resp.status_code == 503 and resp.get_json() == {"status": "stopped"}
    finally:
        d.close()


def test_metrics_need_a_login(dash, coord):
    coord.submit(dash_op, 1).get(timeout=SAFETY)
    client = dash.app.test_client()
    resp = client.get("/metrics")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith('Basic realm="tokengate"')
    basic = base64.b64encode(b"vera:viewer-pw").decode()
    resp = client.get("/metrics", headers={"Authorization": f"Basic {basic}"})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    names = {f.name for f in text_string_to_metric_families(resp.text)}
    assert any(n.startswith("tokengate_") for n in names)
    # cached: the same header again, no new verification needed
    assert client.get("/metrics", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    bad = base64.b64encode(b"vera:nope").decode()
    assert client.get("/metrics", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic !!!"}).status_code == 401
    client, _ = logged_in(dash, "vera")
    resp = client.get("/metrics")
    assert resp.status_code == 200
    list(text_string_to_metric_families(resp.text))


def test_security_headers(dash):
    client = dash.app.test_client()
    for path in ("/login", "/healthz", "/metrics", "/static/dashboard.css"):
        resp = client.get(path)
        assert resp.headers["Content-Security-Policy"] == CSP, path
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        resp.close()
    assert "frame-ancestors 'none'" in CSP and "script-src 'self'" in CSP
    client, _ = logged_in(dash, "vera")
    for path in ("/", "/api/state", "/api/audit", "/login"):
        assert client.get(path).headers["Cache-Control"] == "no-store", path


def test_api_state_and_audit(dash):
    client = dash.app.test_client()
    assert client.get("/api/state").status_code == 401
    assert client.get("/api/audit").status_code == 401
    client, _ = logged_in(dash, "vera")
    state = client.get("/api/state").get_json()
    assert state["coordinator"] == dash.coordinator.name
    assert state["system"]["running"] is True
    audit = client.get("/api/audit?limit=5").get_json()
    assert audit[0]["action"] == "login" and audit[0]["user"] == "vera"
    assert client.get("/api/audit?limit=0").status_code == 400
    assert client.get("/api/audit?limit=abc").status_code == 400


# -- Socket.IO connections -------------------------------------------------------------------


def test_a_socket_needs_a_session(dash):
    client = dash.app.test_client()
    sc = connect(dash, client, "whatever")
    assert not sc.is_connected()
    assert dash.live.clients() == 0


def test_a_socket_needs_the_sessions_csrf_token(dash):
    client, csrf = logged_in(dash, "ada")
    assert not connect(dash, client, "0" * len(csrf)).is_connected()
    assert not dash.socketio.test_client(
        dash.app, flask_test_client=client, headers={"Origin": ORIGIN}
    ).is_connected()
    assert connect(dash, client, csrf).is_connected()


def test_a_socket_from_another_origin_is_refused_and_audited(dash):
    client, csrf = logged_in(dash, "ada")
    before = len(records(dash))
    assert not connect(dash, client, csrf, origin="http://evil.example").is_connected()
    new = records(dash)[before:]
    assert len(new) == 1
    assert (new[0]["action"], new[0]["outcome"], new[0]["target"]) == (
        "connect",
        "refused",
        "http://evil.example",
    )
    # No Origin at all (a same-origin polling handshake): the session and CSRF token decide.
    assert connect(dash, client, csrf, origin=None).is_connected()
    assert not connect(dash, client, "not-the-token", origin=None).is_connected()
    assert not connect(dash, client, csrf, origin="http://localhost:1").is_connected()


def test_allowed_origins(coord, tmp_path, clock):
    d = make_dash(coord, tmp_path, clock, allowed_origins=["https://ops.example.com"])
    try:
        client, csrf = logged_in(d, "ada")
        assert connect(d, client, csrf, origin="https://ops.example.com").is_connected()
    finally:
        d.close()
    with pytest.raises(ConfigurationError, match="not scheme://host"):
        DashboardConfig.build(users=USERS, allowed_origins=["ops.example.com"])


@pytest.mark.parametrize("user", ["vera", "otto", "ada"])
def test_hello_names_the_user_role_and_actions(dash, coord, user):
    coord.register_launchable(launch_me)
    client, csrf = logged_in(dash, user)
    sc = connect(dash, client, csrf)
    got = sc.get_received()
    assert [m["name"] for m in got] == ["hello", "state"]
    hello = got[0]["args"][0]
    assert hello["user"] == user and hello["role"] == ROLE_OF[user]
    assert hello["coordinator"] == coord.name
    expected = {
        "vera": [],
        "otto": [a for a, r in ACTIONS.items() if r == "operator"],
        "ada": list(ACTIONS),
    }[user]
    assert hello["actions"] == expected
    if user == "ada":
        assert hello["launchables"] == [
            {
                "name": "launch_me",
                "signature": "(n: int, label: str = 'x')",
                "doc": "Makes a label.",
            }
        ]
    else:
        assert hello["launchables"] == []
    state = got[1]["args"][0]
    assert state["version"] >= 1 and state["coordinator"] == coord.name


# -- controls ----------------------------------------------------------------------------------

_PARAMS = {
    "kill": {"token_id": 1},
    "reprioritize": {"token_id": 1, "priority": "high"},
    "reroute": {"token_id": 1, "weight": "heavy"},
    "block": {"operation": "dash_op"},
    "unblock": {"operation": "dash_op"},
    "force_open": {"operation": "dash_op"},
    "quarantine_release": {"operation": "qop", "dry_run": True},
    "quarantine_discard": {"operation": "qop", "dry_run": True},
    "set_limit": {"operation": "dash_op", "max_concurrency": 2},
    "launch": {"name": "launch_me", "args": [1]},
}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_a_viewer_may_take_no_action(dash, coord, action):
    sc, csrf = session_socket(dash, "vera")
    before = len(records(dash))
    was = (coord.paused, coord.admission_open)
    ack = control(sc, csrf, action, **_PARAMS.get(action, {}))
    assert ack["ok"] is False and ack["outcome"] == "refused"
    assert f"needs the {ACTIONS[action]} role" in ack["message"]
    assert (coord.paused, coord.admission_open) == was
    new = records(dash)[before:]
    assert len(new) == 1
    assert (new[0]["action"], new[0]["outcome"], new[0]["user"], new[0]["role"]) == (
        action,
        "refused",
        "vera",
        "viewer",
    )


@pytest.mark.parametrize("action", ["set_limit", "launch"])
def test_an_operator_may_not_take_admin_actions(dash, coord, action):
    coord.register_launchable(launch_me)
    sc, csrf = session_socket(dash, "otto")
    created = coord.stats()["created"]
    ack = control(sc, csrf, action, **_PARAMS[action])
    assert ack["outcome"] == "refused" and "needs the admin role" in ack["message"]
    assert "dash_op" not in coord.stats()["limits"]
    assert coord.stats()["created"] == created
    assert records(dash)[-1]["outcome"] == "refused"


def _one_record(dash, before, action, outcome, user, target=None):
    new = records(dash)[before:]
    assert len(new) == 1, new
    rec = new[0]
    assert rec["action"] == action and rec["outcome"] == outcome
    assert rec["user"] == user and rec["role"] == ROLE_OF[user]
    assert rec["client"] == "127.0.0.1"
    assert rec["target"] == target
    assert rec["detail"]
    return rec


def test_pause_resume_drain(dash, coord):
    sc, csrf = session_socket(dash, "otto")
    before = len(records(dash))
    ack = control(sc, csrf, "pause")
    assert ack == {
        "ok": True,
        "outcome": "ok",
        "message": "paused: new tokens wait in the pool",
        "result": None,
    }
    assert coord.paused
    _one_record(dash, before, "pause", "ok", "otto")
    before = len(records(dash))
    assert control(sc, csrf, "resume")["ok"] and not coord.paused
    _one_record(dash, before, "resume", "ok", "otto")
    coord.pause()
    release = threading.Event()
    token = coord.submit(release.wait, SAFETY)  # in flight until released
    before = len(records(dash))
    ack = control(sc, csrf, "drain")
    assert ack["ok"] and ack["message"] == "draining: admission closed, 1 in flight"
    assert not coord.admission_open
    release.set()
    assert token.get(timeout=SAFETY) is True  # drain un-pauses: the queued token runs
    _one_record(dash, before, "drain", "ok", "otto")
    assert control(sc, csrf, "resume")["ok"] and coord.admission_open
    dash.controls.close(timeout=SAFETY)
    assert not [t for t in threading.enumerate() if t.name == "tokengate-dashboard-drain"]


def test_kill_reprioritize_reroute_a_queued_token(dash, coord):
    sc, csrf = session_socket(dash, "otto")
    coord.pause()
    a = coord.submit(dash_op, 1)
    b = coord.submit(dash_op, 2)
    dash.live.publish_now()
    queued = dash.live.snapshot()["queued"]
    assert [q["token_id"] for q in queued] == [a.token_id, b.token_id]
    assert queued[0]["state"] == "WAITING" and queued[0]["operation"] == "dash_op"
    before = len(records(dash))
    ack = control(sc, csrf, "reprioritize", token_id=b.token_id, priority="high")
    assert ack["ok"], ack
    assert b.priority == "high"
    _one_record(dash, before, "reprioritize", "ok", "otto", str(b.token_id))
    ack = control(sc, csrf, "reroute", token_id=b.token_id, weight="heavy")
    assert ack["ok"], ack
    before = len(records(dash))
    ack = control(sc, csrf, "kill", token_id=a.token_id)
    assert ack["ok"] and ack["message"] == f"token {a.token_id} killed"
    assert a.state is TokenState.KILLED
    _one_record(dash, before, "kill", "ok", "otto", str(a.token_id))
    before = len(records(dash))
    ack = control(sc, csrf, "kill", token_id=a.token_id)
    assert ack["outcome"] == "failed"
    assert ack["message"] == f"token {a.token_id} is not queued here"
    _one_record(dash, before, "kill", "failed", "otto", str(a.token_id))
    assert control(sc, csrf, "reroute", token_id=999_999, weight="light")["outcome"] == "failed"
    coord.resume()
    assert b.get(timeout=SAFETY) == 2


def test_block_unblock_force_open(dash, coord):
    coord.submit(dash_op).get(timeout=SAFETY)
    sc, csrf = session_socket(dash, "otto")
    before = len(records(dash))
    ack = control(sc, csrf, "block", operation="dash_op")
    assert ack["ok"] and ack["result"] == {"breaker_state": "forced_open"}
    assert coord.guard_house.breaker_state("dash_op") == "forced_open"
    _one_record(dash, before, "block", "ok", "otto", "dash_op")
    assert control(sc, csrf, "unblock", operation="dash_op")["ok"]
    assert coord.guard_house.breaker_state("dash_op") == "closed"
    assert control(sc, csrf, "force_open", operation="dash_op")["ok"]
    assert coord.guard_house.breaker_state("dash_op") == "open"
    guard = {g["operation"]: g for g in dash.live.snapshot()["guard"]}
    assert guard["dash_op"]["breaker_state"] == "open"


def test_set_limit(dash, coord):
    sc, csrf = session_socket(dash, "ada")
    before = len(records(dash))
    ack = control(
        sc, csrf, "set_limit", operation="dash_op", max_concurrency=3, rate_limit=5.0, rate_burst=2
    )
    assert ack["ok"], ack
    limit = coord.stats()["limits"]["dash_op"]
    assert (limit["max_concurrency"], limit["rate"], limit["burst"]) == (3, 5.0, 2)
    _one_record(dash, before, "set_limit", "ok", "ada", "dash_op")
    guard = {g["operation"]: g for g in dash.live.snapshot()["guard"]}
    assert guard["dash_op"]["limit"]["max_concurrency"] == 3
    assert guard["dash_op"]["limit"]["rate_limit"] == 5.0
    ack = control(sc, csrf, "set_limit", operation="dash_op", max_concurrency=0)
    assert ack["outcome"] == "invalid" and "max_concurrency" in ack["message"]
    assert coord.stats()["limits"]["dash_op"]["max_concurrency"] == 3


def test_launch(dash, coord):
    coord.register_launchable(launch_me)
    sc, csrf = session_socket(dash, "ada")
    before = len(records(dash))
    ack = control(sc, csrf, "launch", name="launch_me", args=[4], kwargs={"label": "n"})
    assert ack["ok"], ack
    token_id = ack["result"]["token_id"]
    assert isinstance(token_id, int)
    _one_record(dash, before, "launch", "ok", "ada", "launch_me")
    created = coord.stats()["created"]
    for params, word in (
        ({"name": "launch_me", "args": [1], "kwargs": {"nope": 1}}, "nope"),
        ({"name": "launch_me", "args": []}, "missing a required argument: 'n'"),
        ({"name": "launch_me", "args": [1, 2, 3]}, "arguments"),
        ({"name": "missing", "args": []}, "missing"),
        ({"name": "launch_me", "args": "4"}, "args must be a list"),
        ({"name": "launch_me", "kwargs": [1]}, "kwargs must be an object"),
    ):
        before = len(records(dash))
        ack = control(sc, csrf, "launch", **params)
        assert ack["outcome"] == "invalid", (params, ack)
        assert word in ack["message"]
        assert len(records(dash)) == before + 1
    assert coord.stats()["created"] == created, "nothing was submitted"


@pytest.mark.parametrize(
    ("action", "params", "word"),
    [
        ("kill", {"token_id": True}, "token_id"),
        ("kill", {"token_id": -1}, "token_id"),
        ("kill", {"token_id": "3"}, "token_id"),
        ("kill", {}, "needs the parameter token_id"),
        ("kill", {"token_id": 1, "extra": 1}, "unexpected parameter"),
        ("reprioritize", {"token_id": 1, "priority": "urgent"}, "priority"),
        ("reroute", {"token_id": 1, "weight": 3}, "weight"),
        ("block", {"operation": ""}, "operation"),
        ("block", {"operation": "x" * 201}, "at most 200"),
        ("block", {"operation": ["a"]}, "operation"),
        ("quarantine_release", {"dry_run": True}, "give record ids or a filter"),
        ("quarantine_discard", {"record_ids": "abc"}, "record_ids"),
        ("quarantine_discard", {"operation": "q", "dry_run": "yes"}, "dry_run"),
        ("quarantine_discard", {"since": float("nan")}, "since"),
        ("set_limit", {"operation": "o", "max_concurrency": 1.5}, "max_concurrency"),
        ("set_limit", {"operation": "o", "rate_limit": -1}, "rate_limit"),
        ("nonsense", {}, "unknown action 'nonsense'; valid: drain"),
    ],
)
def test_parameters_are_checked_before_the_coordinator_is_called(dash, action, params, word):
    sc, csrf = session_socket(dash, "ada")
    before = len(records(dash))
    ack = control(sc, csrf, action, **params)
    assert ack["outcome"] == "invalid", ack
    assert word in ack["message"]
    assert len(records(dash)) == before + 1
    assert records(dash)[-1]["outcome"] == "invalid"


def test_quarantine_preview_discard_and_release(dash, coord):
    r1 = quarantine_record(coord)
    r2 = quarantine_record(coord)
    other = quarantine_record(coord, "other")
    sc, csrf = session_socket(dash, "otto")
    snap = dash.live.snapshot()["quarantine"]
    assert snap["count"] == 3
    assert {r["record_id"] for r in snap["records"]} == {
        r1.record_id,
        r2.record_id,
        other.record_id,
    }
    before = len(records(dash))
    ack = control(sc, csrf, "quarantine_release", operation="qop", dry_run=True)
    assert ack["ok"], ack
    assert {r["record_id"] for r in ack["result"]["selected"]} == {r1.record_id, r2.record_id}
    assert sorted(ack["result"]["done"]) == sorted([r1.record_id, r2.record_id])
    assert ack["message"].startswith("dry run")
    assert len(coord.guard_house.quarantined()) == 3, "a dry run touches nothing"
    _one_record(dash, before, "quarantine_release", "ok", "otto", "qop")
    ack = control(sc, csrf, "quarantine_discard", record_ids=[r1.record_id], dry_run=False)
    assert ack["ok"] and ack["result"]["done"] == [r1.record_id]
    ack = control(sc, csrf, "quarantine_release", record_ids=[r2.record_id])
    assert ack["ok"] and ack["result"]["done"] == [r2.record_id], ack
    assert [r.record_id for r in coord.guard_house.quarantined()] == [other.record_id]
    assert dash.live.snapshot()["quarantine"]["count"] == 1  # re-read at once after an action
    ack = control(sc, csrf, "quarantine_discard", record_ids=["nope"])
    assert ack["outcome"] == "failed"


def test_a_control_with_a_wrong_csrf_token_is_refused(dash, coord):
    sc, _ = session_socket(dash, "ada")
    before = len(records(dash))
    ack = sc.emit("control", {"action": "pause", "csrf": "bad"}, callback=True)
    assert ack["outcome"] == "refused" and ack["message"] == "invalid CSRF token"
    ack = sc.emit("control", {"action": "pause"}, callback=True)
    assert ack["outcome"] == "refused"
    assert not coord.paused
    assert [r["outcome"] for r in records(dash)[before:]] == ["refused", "refused"]


def test_a_control_after_the_session_expired_is_refused_and_disconnects(dash, coord, clock):
    sc, csrf = session_socket(dash, "ada")
    clock.advance(8 * 3600)
    ack = control(sc, csrf, "pause")
    assert ack["outcome"] == "refused" and "expired" in ack["message"]
    assert not coord.paused
    rec = records(dash)[-1]
    assert (rec["action"], rec["outcome"], rec["user"]) == ("pause", "refused", "ada")
    assert sc.is_connected()  # the acknowledgement goes out first
    clock.advance(1)
    dash.live.publish_now()
    assert not sc.is_connected()
    assert dash.live.clients() == 0


def test_logout_disconnects_the_sessions_sockets(dash):
    client, csrf = logged_in(dash, "otto")
    sc = connect(dash, client, csrf)
    assert sc.is_connected()
    client.post("/logout", data={"csrf_token": csrf})
    assert not sc.is_connected()


# -- state and flow control -------------------------------------------------------------------


def test_a_client_that_never_acks_gets_one_state_then_the_newest(dash, coord):
    client, csrf = logged_in(dash, "vera")
    slow = connect(dash, client, csrf)
    fast_client, fast_csrf = logged_in(dash, "vera")
    fast = connect(dash, fast_client, fast_csrf)
    assert len(states(slow)) == 1
    assert len(states(fast)) == 1
    assert ack_states(dash, fast) == 1
    for i in range(5):
        (coord.pause if i % 2 == 0 else coord.resume)()
        dash.live.publish_now()
        got = states(fast)
        assert len(got) <= 1
        if got:
            assert got[0]["system"]["paused"] is (i % 2 == 0)
            ack_states(dash, fast)
    assert states(slow) == [], "nothing more until it acknowledges"
    version = dash.live.publish_now()
    assert ack_states(dash, slow) == 1
    got = states(slow)
    assert len(got) == 1
    assert got[0]["version"] == version and got[0]["system"]["paused"] is True
    assert ack_states(dash, slow) == 1
    assert states(slow) == []  # nothing newer: nothing sent


def test_an_unchanged_snapshot_is_not_sent_again(dash, monkeypatch):
    sc, _ = session_socket(dash, "vera")
    ack_states(dash, sc)
    fixed = dash.live.snapshot()
    # Only the time differs between these snapshots: nothing is sent, the version stands.
    stamps = iter(range(10**6))
    monkeypatch.setattr(dash.live._state, "build", lambda: dict(fixed, time=next(stamps)))
    v1 = dash.live.publish_now()
    states(sc)
    ack_states(dash, sc)
    assert dash.live.publish_now() == dash.live.publish_now() == v1
    assert states(sc) == []
    v2 = v1
    # A changed figure is a new version, and it is sent.
    changed = dict(fixed, pool=dict(fixed["pool"], completed=fixed["pool"]["completed"] + 1))
    monkeypatch.setattr(dash.live._state, "build", lambda: dict(changed, time=next(stamps)))
    assert dash.live.publish_now() == v2 + 1
    (got,) = states(sc)
    assert got["pool"]["completed"] == fixed["pool"]["completed"] + 1


def test_recent_executions_and_series(dash, coord):
    tokens = [coord.submit(dash_op, i) for i in range(5)]
    for t in tokens:
        t.get(timeout=SAFETY)

    def boom():
        raise ValueError("boom <b>")

    coord.submit(boom).exception(timeout=SAFETY)
    assert coord.events.flush(SAFETY)
    snap = dash.live.snapshot()
    recent = snap["recent"]
    assert recent[0]["operation"].endswith("boom") and recent[0]["outcome"] == "failed"
    assert recent[0]["success"] is False and recent[0]["error"] == "ValueError: boom <b>"
    done = [r for r in recent if r["operation"] == "dash_op"]
    assert len(done) == 5 and all(r["success"] and r["outcome"] == "completed" for r in done)
    assert all(r["duration_ms"] is not None for r in done)
    assert snap["series"]["interval_s"] == 1
    assert len(snap["series"]["t"]) == len(snap["series"]["completed"]) <= 300
    json.dumps(snap, allow_nan=False)  # JSON numbers only


def test_a_script_in_an_operation_name_travels_as_plain_text(dash, coord):
    evil = "<script>alert(1)</script>"

    def op() -> None:
        pass

    op.__name__ = op.__qualname__ = evil
    coord.submit(op).get(timeout=SAFETY)
    assert coord.events.flush(SAFETY)
    sc, _ = session_socket(dash, "vera")
    ack_states(dash, sc)
    dash.live.publish_now()
    snap = dash.live.snapshot()
    assert snap["recent"][0]["operation"] == evil
    assert evil in {g["operation"] for g in snap["guard"]}
    client, _ = logged_in(dash, "vera")
    resp = client.get("/api/state")
    assert resp.mimetype == "application/json"
    assert resp.get_json()["recent"][0]["operation"] == evil


def test_snapshot_shape(dash, coord):
    snap = dash.live.snapshot()
    assert set(snap) == {
        "version", "time", "coordinator", "system", "pool", "queued", "guard", "recent",
        "series", "quarantine", "audit",
    }  # fmt: skip
    system = snap["system"]
    keys = (
        "running", "paused", "admission_open", "uptime_s", "workers", "physical_cores",
        "logical_cpus", "cores", "pinned", "mode", "throughput_per_s", "per_core",
    )  # fmt: skip
    for key in keys:
        assert key in system
    assert system["per_core"][0]["core"] == 1
    assert set(system["per_core"][0]["routed"]) == {"heavy", "medium", "light"}
    assert set(snap["pool"]) == {
        "created", "waiting", "admitted", "executing", "completed", "failed", "killed",
        "timed_out",
    }  # fmt: skip


# -- lifecycle --------------------------------------------------------------------------------


def test_close_unsubscribes_and_stops_its_threads(coord, tmp_path, clock):
    subscribers = coord.events.stats()["subscribers"]
    d = make_dash(coord, tmp_path, clock, update_interval=0.05)
    assert coord.events.stats()["subscribers"] == subscribers + 1
    assert any(t.name == "tokengate-dashboard-publisher" for t in threading.enumerate())
    d.close()
    d.close()
    assert coord.events.stats()["subscribers"] == subscribers
    assert not [t for t in threading.enumerate() if t.name.startswith("tokengate-dashboard")]


def test_bad_options_raise_before_binding(coord, tmp_path):
    kw = {"users": USERS, "audit_log": tmp_path / "a.jsonl"}
    with pytest.raises(ConfigurationError, match="port"):
        serve(coord, "127.0.0.1", -1, **kw)
    with pytest.raises(ConfigurationError, match="keyfile needs certfile"):
        serve(coord, "127.0.0.1", 0, keyfile="k.pem", **kw)
    with pytest.raises(ConfigurationError, match="TLS certificate"):
        serve(coord, "127.0.0.1", 0, certfile=tmp_path / "none.pem", **kw)
    with pytest.raises(ConfigurationError, match="session_lifetime"):
        serve(coord, "127.0.0.1", 0, session_lifetime=0, **kw)
    with pytest.raises(ConfigurationError, match="update_interval"):
        serve(coord, "127.0.0.1", 0, update_interval=True, **kw)
    with pytest.raises(ConfigurationError, match="plain text"):
        serve(coord, "127.0.0.1", 0, users={"a": ("admin", "pw")}, audit_log=tmp_path / "a")
    assert not [t for t in threading.enumerate() if t.name.startswith("tokengate-dashboard")]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_a_real_server(coord, tmp_path):
    requests = pytest.importorskip("requests")
    import socketio

    coord.register_launchable(launch_me)
    with serve(
        coord, "127.0.0.1", 0, users=USERS, audit_log=tmp_path / "a.jsonl", update_interval=0.1
    ) as server:
        assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
        assert server.generated_password is None
        with urllib.request.urlopen(server.url + "/healthz", timeout=SAFETY) as resp:
            assert resp.status == 200 and json.load(resp) == {"status": "ok"}
        with urllib.request.urlopen(server.url + "/login", timeout=SAFETY) as resp:
            assert resp.headers["Content-Security-Policy"] == CSP
            assert b'name="csrf_token"' in resp.read()
        http = requests.Session()
        page = http.get(server.url + "/login", timeout=SAFETY)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        resp = http.post(
            server.url + "/login",
            data={"username": "ada", "password": "admin-pw", "csrf_token": token},
            allow_redirects=False,
            timeout=SAFETY,
        )
        assert resp.status_code == 303
        csrf = re.search(
            r'name="csrf-token" content="([^"]+)"', http.get(server.url + "/", timeout=SAFETY).text
        ).group(1)

        hello: list[dict] = []
        got_state = threading.Event()
        paused_state = threading.Event()
        sio = socketio.Client(http_session=http, reconnection=False)

        @sio.on("hello")
        def on_hello(data):
            hello.append(data)

        @sio.on("state")
        def on_state(data):
            got_state.set()
            if data["system"]["paused"]:
                paused_state.set()

        sio.connect(
            server.url,
            headers={"Origin": server.url},
            auth={"csrf": csrf},
            transports=["polling"],
            wait_timeout=SAFETY,
        )
        try:
            assert got_state.wait(SAFETY)
            assert hello and hello[0]["user"] == "ada"
            assert hello[0]["launchables"][0]["name"] == "launch_me"
            ack = sio.call("control", {"action": "pause", "csrf": csrf}, timeout=SAFETY)
            assert ack["ok"] and coord.paused
            assert paused_state.wait(SAFETY), "the state after the change arrives (acks work)"
            ack = sio.call(
                "control", {"action": "launch", "csrf": csrf, "name": "launch_me", "args": [2]},
                timeout=SAFETY,
            )  # fmt: skip
            assert ack["ok"], ack
            coord.resume()
        finally:
            sio.disconnect()
        evil = socketio.Client(http_session=http, reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            evil.connect(
                server.url,
                headers={"Origin": "http://evil.example"},
                auth={"csrf": csrf},
                transports=["polling"],
                wait_timeout=SAFETY,
            )
        refused = [r for r in server.audit.tail(100) if r["action"] == "connect"]
        assert refused and refused[-1]["target"] == "http://evil.example"
    assert not [t for t in threading.enumerate() if t.name.startswith("tokengate-dashboard")]
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/healthz", timeout=2)


def test_without_users_an_admin_password_is_generated(coord, tmp_path, clock, caplog):
    with caplog.at_level("WARNING", "tokengate.dashboard"):
        cfg = DashboardConfig.build(audit_log=tmp_path / "a.jsonl", clock=clock, environ={})
    password = cfg.generated_password
    assert password and list(cfg.users) == ["admin"]
    assert sum("no dashboard users are configured" in r.message for r in caplog.records) == 1
    d = create_app(coord, cfg).extensions["tokengate_dashboard"]
    try:
        client = d.app.test_client()
        assert login(client, "admin", password).status_code == 303
    finally:
        d.close()


# -- review findings (#10 review): throttle, verification bound, sockets, Host --------------


def login_token(client) -> str:
    page = client.get("/login")
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class BlockingCheck:
    """Replaces the password check with one that waits until released (and counts)."""

    def __init__(self, monkeypatch) -> None:
        import tokengate.dashboard.app as appmod

        self.real = appmod.authenticate
        self.calls: list[str] = []
        self.inside = threading.Semaphore(0)
        self.go = threading.Event()
        monkeypatch.setattr(appmod, "authenticate", self)

    def __call__(self, users, name, password):
        self.calls.append(name)
        self.inside.release()
        assert self.go.wait(SAFETY)
        return self.real(users, name, password)


def kinds(dash, *actions):
    return [(r["action"], r["outcome"]) for r in records(dash) if r["action"] in actions]


def run_parallel(dash, check, request, n_checked=5, n_more=3):
    """``n_checked`` requests get into the password check (and wait there); then
    ``n_more`` more are sent and must come back without one; then the first are let go."""
    results: dict[int, int] = {}

    def attempt(i):
        results[i] = request(i)

    first = [threading.Thread(target=attempt, args=(i,)) for i in range(n_checked)]
    for t in first:
        t.start()
    for _ in range(n_checked):
        assert check.inside.acquire(timeout=SAFETY)
    more = [threading.Thread(target=attempt, args=(n_checked + i,)) for i in range(n_more)]
    for t in more:
        t.start()
    for t in more:
        t.join(SAFETY)
        assert not t.is_alive()
    later = [results[n_checked + i] for i in range(n_more)]
    check.go.set()
    for t in first:
        t.join(SAFETY)
    return [results[i] for i in range(n_checked)], later


def test_parallel_form_logins_get_five_password_checks_at_most(dash, monkeypatch):
    """H1: attempts are counted before their password is checked."""
    from tokengate.dashboard.auth import VerificationSlots

    dash.verifications = VerificationSlots(10, wait=SAFETY)
    check = BlockingCheck(monkeypatch)
    clients = [dash.app.test_client() for _ in range(8)]
    tokens = [login_token(c) for c in clients]

    def post(i):
        data = {"username": "ada", "password": f"guess{i}", "csrf_token": tokens[i]}
        return clients[i].post("/login", data=data).status_code

    checked, later = run_parallel(dash, check, post)
    assert later == [429, 429, 429]  # refused without a password check
    assert checked == [401] * 5
    assert len(check.calls) == 5
    assert login(dash.app.test_client(), "ada").status_code == 429  # locked out now
    assert len(check.calls) == 5
    # the first refused of the burst, the 5 checked, the lockout, the first refused of the
    # lockout (the checked ones end in parallel: their order may vary)
    expected = [("login", "failed")] * 5 + [("login", "refused")] * 2
    expected.append(("login_lockout", "refused"))
    assert sorted(kinds(dash, "login", "login_lockout")) == sorted(expected)
    assert kinds(dash, "login")[-1] == ("login", "refused")


def test_parallel_http_basic_logins_get_five_password_checks_at_most(dash, monkeypatch):
    """H1 and M5 over HTTP Basic: counted before the check, and every check is audited."""
    from tokengate.dashboard.auth import VerificationSlots

    dash.verifications = VerificationSlots(10, wait=SAFETY)
    check = BlockingCheck(monkeypatch)
    clients = [dash.app.test_client() for _ in range(8)]

    def get(i):
        return clients[i].get("/metrics", headers=basic("ada", f"guess{i}")).status_code

    checked, later = run_parallel(dash, check, get)
    assert later == [429, 429, 429]
    assert checked == [401] * 5 and len(check.calls) == 5
    resp = dash.app.test_client().get("/api/state", headers=basic("ada", "admin-pw"))
    assert resp.status_code == 429 and "Retry-After" in resp.headers
    failed = [r for r in records(dash) if r["action"] == "login" and r["outcome"] == "failed"]
    assert len(failed) == 5
    assert all(r["target"] == "ada" and "HTTP Basic" in r["detail"] for r in failed)
    assert kinds(dash, "login_lockout") == [("login_lockout", "refused")]


def test_failed_http_basic_logins_are_audited_and_lock_out(dash):
    """M5: each checked Basic attempt is audited; refusals while locked once per lockout."""
    client = dash.app.test_client()
    for i in range(4):
        assert client.get("/metrics", headers=basic("vera", f"nope{i}")).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic !!!"}).status_code == 401
    for _ in range(3):
        assert client.get("/metrics", headers=basic("vera", "viewer-pw")).status_code == 429
    assert kinds(dash, "login", "login_lockout") == [
        *[("login", "failed")] * 5,
        ("login_lockout", "refused"),
        ("login", "refused"),
    ]
    assert "malformed" in records(dash)[4]["detail"]


def test_logins_are_answered_busy_when_no_verification_slot_is_free(dash, monkeypatch):
    """H2: at most VERIFY_SLOTS verifications at once; beyond: 503 without verifying."""
    import tokengate.dashboard.app as appmod
    from tokengate.dashboard.auth import VerificationSlots

    calls: list[str] = []
    real = appmod.authenticate
    monkeypatch.setattr(appmod, "authenticate", lambda u, n, p: calls.append(n) or real(u, n, p))
    slots = dash.verifications = VerificationSlots(2, wait=0.01)
    assert slots.acquire() and slots.acquire()  # two verifications run elsewhere
    client = dash.app.test_client()
    for name in ("ada", "nobody"):  # an unknown name waits for a slot like a known one
        data = {"username": name, "password": "x", "csrf_token": login_token(client)}
        resp = client.post("/login", data=data)
        assert resp.status_code == 503 and "busy" in resp.text
        assert resp.headers["Retry-After"] == "1"
    for path in ("/metrics", "/api/state"):
        assert client.get(path, headers=basic("nobody", "x")).status_code == 503
    assert calls == []
    slots.release()
    slots.release()
    # a busy answer is no failure: four wrong passwords and the right one still go through
    for _ in range(4):
        assert login(client, "ada", "wrong").status_code == 401
    assert login(client, "ada").status_code == 303
    assert calls == ["ada"] * 5


def test_a_successful_login_does_not_clear_the_failures_of_the_address(dash):
    """M2: an insider's own login between guesses at another account does not reset them,
    and a user who mistyped four times still gets in."""
    client = dash.app.test_client()
    for _ in range(4):
        assert login(client, "ada", "wrong").status_code == 401
    assert login(dash.app.test_client(), "vera").status_code == 303  # the 5th attempt: right
    assert login(dash.app.test_client(), "ada", "wrong").status_code == 401  # locks out
    assert login(dash.app.test_client(), "ada").status_code == 429
    assert kinds(dash, "login_lockout") == [("login_lockout", "refused")]


def test_logins_without_csrf_never_lock_the_user_out(dash, clock):
    """A page of another site can post the login form from the user's address, without the
    token (the login cookie is SameSite=Strict): that must not lock the user out, and it is
    audited at most once a minute per address."""
    client = dash.app.test_client()
    for _ in range(20):
        assert client.post("/login", data={"username": "x" * 200}).status_code == 400
    assert login(client, "ada").status_code == 303
    assert kinds(dash, "login", "login_lockout") == [("login", "refused"), ("login", "ok")]
    clock.advance(61)
    assert client.post("/login", data={"username": "y"}).status_code == 400
    assert kinds(dash, "login")[-1] == ("login", "refused")


def test_successful_password_checks_are_bounded_per_address(dash, clock):
    """An account must not buy unlimited argon2 work: successful checks count as well."""
    for _ in range(dash.throttle.max_checks):
        assert login(dash.app.test_client(), "vera").status_code == 303
    resp = login(dash.app.test_client(), "vera")
    assert resp.status_code == 429 and "too many login attempts" in resp.text
    clock.advance(61)
    assert login(dash.app.test_client(), "vera").status_code == 303


def test_basic_credentials_are_cached_whatever_their_spelling(dash, monkeypatch):
    import base64

    from tokengate.dashboard import app as app_module

    checks = []
    real = app_module.authenticate

    def counting(*args):
        checks.append(args[1])
        return real(*args)

    monkeypatch.setattr(app_module, "authenticate", counting)
    client = dash.app.test_client()
    token = base64.b64encode(b"vera:viewer-pw").decode()
    for header in (f"Basic {token}", f"Basic {token}   ", f"basic  {token}"):
        assert client.get("/metrics", headers={"Authorization": header}).status_code == 200
    assert checks == ["vera"], "one argon2 check for one set of credentials"


def test_engineio_requests_need_a_live_session(dash):
    """M3: refused in front of Engine.IO, so no Engine.IO connection is made."""
    eio = "/socket.io/?EIO=4&transport=polling"
    server = dash.socketio.server
    client = dash.app.test_client()
    resp = client.get(eio)
    assert resp.status_code == 401 and "log in first" in resp.text
    assert client.get(eio + "&sid=whatever").status_code == 401
    assert client.post(eio + "&sid=x", data="40").status_code == 401
    assert not server.environ and not server.eio.sockets
    client, _ = logged_in(dash, "vera")
    assert client.get(eio, headers={"Origin": "http://evil.example"}).status_code == 403
    assert not server.eio.sockets
    resp = client.get(eio, headers={"Origin": ORIGIN})
    assert resp.status_code == 200 and resp.text.startswith("0{")
    assert len(server.eio.sockets) == 1
    sid = json.loads(resp.text[1:])["sid"]
    assert dash.app.test_client().get(f"{eio}&sid={sid}").status_code == 401  # no cookie


def test_engineio_connections_are_capped_per_user_and_in_all(dash):
    from tokengate.dashboard.live import MAX_SOCKETS, MAX_SOCKETS_PER_USER

    assert (MAX_SOCKETS_PER_USER, MAX_SOCKETS) == (16, 256)
    assert (dash.live.max_per_user, dash.live.max_sockets) == (16, 256)
    dash.live.max_per_user, dash.live.max_sockets = 3, 5
    eio = "/socket.io/?EIO=4&transport=polling"
    vera, _ = logged_in(dash, "vera")
    assert [vera.get(eio).status_code for _ in range(3)] == [200, 200, 200]
    # Another session of the same user does not get more: the cap is the user's.
    vera2, _ = logged_in(dash, "vera")
    assert vera2.get(eio).status_code == 429
    otto, _ = logged_in(dash, "otto")
    assert [otto.get(eio).status_code for _ in range(3)] == [200, 200, 503]
    assert vera.get(eio + "&t=1").status_code == 503  # in all, 5 are open
    assert len(dash.socketio.server.eio.sockets) == 5


def test_a_refused_socket_connect_closes_its_engineio_connection(coord, tmp_path):
    """M3: python-socketio answers a refused connect but keeps the Engine.IO connection
    (and its threads); the dashboard closes it."""
    websocket = pytest.importorskip("websocket")
    requests = pytest.importorskip("requests")
    import time

    with serve(coord, "127.0.0.1", 0, users=USERS, audit_log=tmp_path / "a.jsonl") as server:
        http = requests.Session()
        token = re.search(
            r'name="csrf_token" value="([^"]+)"', http.get(server.url + "/login").text
        ).group(1)
        data = {"username": "vera", "password": "viewer-pw", "csrf_token": token}
        assert http.post(server.url + "/login", data=data, allow_redirects=False).status_code == 303
        cookie = "tokengate_session=" + http.cookies["tokengate_session"]
        url = server.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, suppress_origin=True, timeout=SAFETY)
        assert refused.value.status_code == 401  # no cookie: refused before Engine.IO
        ws = websocket.create_connection(
            url, header=[f"Cookie: {cookie}"], suppress_origin=True, timeout=SAFETY
        )
        try:
            assert ws.recv().startswith("0{")
            ws.send('40{"csrf":"wrong"}')
            assert ws.recv() == '44{"message":"connection refused: invalid CSRF token"}'
            try:
                rest = ws.recv()
            except websocket.WebSocketConnectionClosedException:
                rest = "closed"
            assert rest in ("1", "closed", "")  # Engine.IO CLOSE, not a ping 25 s later
            eio = server.dashboard.socketio.server.eio
            deadline = time.monotonic() + SAFETY
            while eio.sockets and time.monotonic() < deadline:
                threading.Event().wait(0.01)
            assert not eio.sockets
        finally:
            ws.close()
        resp = requests.get(server.url + "/login", headers={"Host": f"evil.example:{server.port}"})
        assert resp.status_code == 400  # L3 on a real server


def test_a_control_event_takes_exactly_one_object(dash, coord):
    """L5: two arguments, none, or a non-object: invalid, acknowledged and audited."""
    sc, csrf = session_socket(dash, "otto")
    before = len(records(dash))
    acks = [
        sc.emit("control", {"action": "pause", "csrf": csrf}, "extra", callback=True),
        sc.emit("control", callback=True),
        sc.emit("control", ["pause"], callback=True),
    ]
    assert [a["outcome"] for a in acks] == ["invalid"] * 3
    assert "one object argument, got 2" in acks[0]["message"]
    new = records(dash)[before:]
    assert [(r["action"], r["outcome"], r["user"]) for r in new] == [
        ("control", "invalid", "otto"),
        ("control", "invalid", "otto"),
        ("control", "invalid", "otto"),
    ]
    assert not coord.paused


def test_a_request_without_origin_is_not_logged_as_refused(dash, caplog):
    """L9: Engine.IO asks about the origin of every polling response, None when same-origin."""
    environ = {"HTTP_HOST": "localhost", "wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1"}
    with caplog.at_level("INFO", "tokengate.dashboard"):
        assert dash.live.origin_allowed(None, environ) is False
        assert dash.live.origin_allowed("", environ) is False
        assert dash.live.origin_allowed(ORIGIN, environ) is True
    assert not [r for r in caplog.records if "refused" in r.getMessage()]
    assert not kinds(dash, "connect")


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8080", "LOCALHOST:1", "127.0.0.1:5000", "[::1]:5000", "10.1.2.3"],
)
def test_loopback_names_and_ip_addresses_are_accepted_hosts(dash, host):
    assert dash.app.test_client().get("/healthz", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:5000", "localhost.evil.example", "127.0.0.1.nip.io",
             "[::1", "localhost:abc", "a b"],
)  # fmt: skip
def test_other_host_names_are_refused(dash, host):
    """L3 (DNS rebinding): a page of another site resolved to this address is refused."""
    client = dash.app.test_client()
    assert client.get("/login", headers={"Host": host}).status_code == 400
    resp = client.post("/login", data={"username": "ada"}, headers={"Host": host})
    assert resp.status_code == 400 and "allowed_hosts" in resp.text
    eio = "/socket.io/?EIO=4&transport=polling"
    assert client.get(eio, headers={"Host": host}).status_code == 400
    assert records(dash) == []  # neither audited nor counted by the throttle


def test_allowed_hosts(coord, tmp_path, clock):
    def status(host, **options):
        d = make_dash(coord, tmp_path, clock, **options)
        try:
            return d.app.test_client().get("/healthz", headers={"Host": host}).status_code
        finally:
            d.close()

    assert status("ops.example.com", allowed_hosts=["ops.example.com"]) == 200
    assert status("evil.example", allowed_hosts=["ops.example.com"]) == 400
    assert status("ops.example.com:8443", allowed_origins=["https://ops.example.com:8443"]) == 200
    assert status("evil.example", allowed_hosts=["*"]) == 200
    assert status("evil.example", behind_proxy=True) == 200  # the proxy checks the Host
    assert status("evil.example", behind_proxy=True, allowed_hosts=["ops.example.com"]) == 400
    for bad in (["https://ops.example.com"], ["ops.example.com:80"], [3], [""]):
        with pytest.raises(ConfigurationError, match="allowed"):
            DashboardConfig.build(users=USERS, allowed_hosts=bad)
