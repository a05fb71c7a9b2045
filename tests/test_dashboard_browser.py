"""End-to-end tests of the dashboard page: a real server on 127.0.0.1, a real running
OperationsCoordinator, and Chromium driven by Playwright (sync API).

Needs Debian's chromium at /usr/bin/chromium (``apt-get install chromium``) and Playwright for
Python (``pip install playwright``). Without them the module is skipped, unless
``TOKENGATE_REQUIRE_BROWSER=1`` (CI) makes that a failure. The page runs under the server's
Content-Security-Policy, so the tests wait with ``expect(locator)`` (auto-waiting) and evaluate
only function expressions.
"""

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
REQUIRE_BROWSER = os.environ.get("TOKENGATE_REQUIRE_BROWSER") == "1"


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (install it: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is missing (install it: pip install playwright)"
    try:
        import tokengate.dashboard  # noqa: F401
    except ImportError as exc:
        return (
            f"the dashboard's dependencies are missing: {exc} (pip install 'tokengate[dashboard]')"
        )
    return None


_WHY = _missing()
if _WHY is not None:
    if REQUIRE_BROWSER:
        pytest.fail(f"TOKENGATE_REQUIRE_BROWSER=1 but {_WHY}", pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from tokengate import OperationsCoordinator, TokenState, task_token_guard  # noqa: E402
from tokengate.dashboard import hash_password, serve  # noqa: E402
from tokengate.demo import run_workload  # noqa: E402

TIMEOUT_MS = 10_000
PASSWORDS = {"ada": "ada-admin-pw", "otto": "otto-operator-pw", "vic": "vic-viewer-pw"}
ROLES = {"ada": "admin", "otto": "operator", "vic": "viewer"}
XSS_NAME = "<script>window.__xss=1</script>"


@task_token_guard(operation_type="browser_double", tags={"weight": "light"})
def double(x: int) -> int:
    return 2 * x


@task_token_guard(operation_type="browser_flaky", tags={"weight": "medium"})
def flaky(x: int) -> int:
    if x % 7 == 3:
        raise ValueError(f"boom on purpose ({x})")
    return x


@task_token_guard(operation_type=XSS_NAME, tags={"weight": "light"})
def hostile(x: int) -> int:
    return x


def crunch(n: int, label: str = "x") -> str:
    """Sum the first n numbers (a launchable for the screenshot)."""
    return f"{label}={sum(range(n))}"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def users() -> dict[str, tuple[str, str]]:
    return {name: (ROLES[name], hash_password(pw)) for name, pw in PASSWORDS.items()}


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[OperationsCoordinator]:
    coord = OperationsCoordinator(workers_per_core=2, quarantine_dir=tmp_path / "quarantine")
    coord.start()
    yield coord
    coord.stop(timeout=10)


@pytest.fixture
def server(
    coordinator: OperationsCoordinator, users: dict[str, tuple[str, str]], tmp_path: Path
) -> Iterator[Any]:
    srv = serve(
        coordinator,
        "127.0.0.1",
        0,
        users=users,
        audit_log=tmp_path / "audit.jsonl",
        update_interval=0.1,
    )
    yield srv
    srv.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(msg: Any) -> None:
        # A CSP violation or a renderer's error is a console error; an HTTP error status
        # (the 401 of a refused login) is one too, but that is the server's answer.
        # A WebSocket the server refused (a session that ended) is one as well.
        text = msg.text
        if msg.type != "error" or text.startswith("Failed to load resource"):
            return
        if "/socket.io/" in text and "HTTP Authentication failed" in text:
            return
        problems.append(f"console error: {text}")

    pg.on("console", on_console)
    yield pg
    context.close()
    # No script errors and no Content-Security-Policy violations (these are console errors).
    assert problems == []


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("TOKENGATE_TEST_OUTPUT")
    path = Path(configured) if configured else tmp_path_factory.getbasetemp()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- helpers


def log_in(page: Page, server: Any, user: str) -> None:
    page.goto(server.url + "/login")
    page.fill("#username", user)
    page.fill("#password", PASSWORDS[user])
    page.click("#login-btn")
    expect(page.locator("#connection")).to_have_text("connected", timeout=TIMEOUT_MS)
    expect(page.locator("#user-role")).to_have_text(ROLES[user])
    expect(page.locator("body")).to_have_attribute("data-version", _any_number())


def _any_number() -> Any:
    import re

    return re.compile(r"^\d+$")


def pool(page: Page, name: str) -> Any:
    return page.locator(f"#pool [data-field={name}]")


def recent_outcome(page: Page, token_id: int) -> Any:
    return page.locator(f'#recent tr[data-token-id="{token_id}"] [data-field=outcome]').first


def wait_all(tokens: list[Any]) -> None:
    for t in tokens:
        try:
            t.get(timeout=10)
        except Exception:  # the flaky ones fail on purpose
            pass


# ---------------------------------------------------------------------------- tests


def test_login_then_pool_counts_follow_a_workload(page: Page, server: Any) -> None:
    log_in(page, server, "otto")
    expect(pool(page, "completed")).to_have_text("0")
    tokens = [double(i) for i in range(40)]
    wait_all(tokens)
    expect(pool(page, "completed")).to_have_text("40", timeout=TIMEOUT_MS)
    expect(pool(page, "created")).to_have_text("40")
    expect(pool(page, "failed")).to_have_text("0")
    expect(page.locator('#guard tr[data-operation="browser_double"]')).to_be_visible()
    expect(recent_outcome(page, tokens[-1].token_id)).to_have_text("completed")
    # The operator's buttons are shown, the admin's are not.
    expect(page.locator("#drain-btn")).to_be_visible()
    expect(page.locator("#launch-btn")).to_be_hidden()
    expect(page.locator("#limit-form")).to_be_hidden()


def test_drain_lets_the_queued_tokens_finish_and_closes_admission(
    page: Page, server: Any, coordinator: OperationsCoordinator
) -> None:
    log_in(page, server, "otto")
    coordinator.pause()
    tokens = [double(i) for i in range(6)]
    expect(pool(page, "waiting")).to_have_text("6", timeout=TIMEOUT_MS)
    expect(page.locator("#queued tbody tr")).to_have_count(6)
    page.click("#drain-btn")
    expect(page.locator("#message")).to_have_attribute("data-outcome", "ok", timeout=TIMEOUT_MS)
    expect(page.locator("#message")).to_contain_text("admission closed")
    expect(pool(page, "waiting")).to_have_text("0", timeout=TIMEOUT_MS)
    expect(pool(page, "completed")).to_have_text("6", timeout=TIMEOUT_MS)
    expect(pool(page, "failed")).to_have_text("0")
    expect(page.locator("#system [data-field=admission]")).to_have_text(
        "admission closed: drained", timeout=TIMEOUT_MS
    )
    expect(page.locator("#queued tbody tr")).to_have_count(0)
    assert [t.get(timeout=5) for t in tokens] == [2 * i for i in range(6)]
    assert coordinator.admission_open is False


def test_kill_a_queued_token_from_its_row_and_from_the_token_box(
    page: Page, server: Any, coordinator: OperationsCoordinator
) -> None:
    log_in(page, server, "otto")
    coordinator.pause()
    tokens = [double(i) for i in range(3)]
    first, second = tokens[0], tokens[1]
    row = page.locator(f'#queued tr[data-token-id="{first.token_id}"]')
    expect(row).to_be_visible(timeout=TIMEOUT_MS)
    row.get_by_role("button", name="Kill").click()
    expect(recent_outcome(page, first.token_id)).to_have_text("killed", timeout=TIMEOUT_MS)
    expect(page.locator("#message")).to_have_attribute("data-outcome", "ok")
    assert first.state == TokenState.KILLED

    page.fill("#token-id", str(second.token_id))
    page.click("#kill-btn")
    expect(recent_outcome(page, second.token_id)).to_have_text("killed", timeout=TIMEOUT_MS)
    assert second.state == TokenState.KILLED
    expect(pool(page, "killed")).to_have_text("2")

    # A token that is not queued (it finished) cannot be killed: the server says so.
    coordinator.resume()
    assert tokens[2].get(timeout=5) == 4
    page.fill("#token-id", str(tokens[2].token_id))
    page.click("#kill-btn")
    expect(page.locator("#message")).to_have_attribute("data-outcome", "failed", timeout=TIMEOUT_MS)
    expect(page.locator("#message")).to_contain_text("not queued")


def test_a_wrong_password_is_refused(page: Page, server: Any) -> None:
    page.goto(server.url + "/login")
    page.fill("#username", "ada")
    page.fill("#password", "not-the-password")
    page.click("#login-btn")
    expect(page.locator("#login-error")).to_have_text("wrong user name or password")
    assert "/login" in page.url
    assert not [c for c in page.context.cookies() if c["name"] == "tokengate_session"]
    # The dashboard itself sends the browser back to the form.
    page.goto(server.url + "/")
    expect(page.locator("#login-form")).to_be_visible()


def test_a_viewer_sees_no_controls_and_a_forced_drain_is_refused_by_the_server(
    page: Page, server: Any, coordinator: OperationsCoordinator
) -> None:
    log_in(page, server, "vic")
    expect(page.locator("#drain-btn")).to_be_hidden()
    expect(page.locator("#kill-btn")).to_be_hidden()
    expect(page.locator("#quarantine-form")).to_be_hidden()
    reply = page.evaluate("() => window.tokengate.control('drain', {})")
    assert reply["outcome"] == "refused", reply
    assert reply["ok"] is False
    expect(page.locator("#message")).to_have_attribute("data-outcome", "refused")
    assert coordinator.admission_open is True
    expect(page.locator("#system [data-field=admission]")).to_have_text("admission open")
    # The refusal is in the audit log, and so in the page's audit panel.
    expect(page.locator("#audit tbody tr").first).to_contain_text("refused", timeout=TIMEOUT_MS)
    # Logging out ends the session: the page is the login form again.
    page.click("#logout-btn")
    expect(page.locator("#login-form")).to_be_visible(timeout=TIMEOUT_MS)
    page.goto(server.url + "/")
    expect(page.locator("#login-form")).to_be_visible()


def test_a_page_whose_session_ended_stops_reconnecting(page: Page, server: Any) -> None:
    log_in(page, server, "vic")
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "tokengate_session"]
    assert server.dashboard.sessions.drop(cookie["value"]) is not None
    # The connection drops (as at a restart of the server): the page tries again, is refused
    # at the handshake, finds its session gone and stops, offering to log in again.
    server.dashboard.socketio.server.eio.disconnect()
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-state", "closed", timeout=TIMEOUT_MS)
    expect(connection).to_contain_text("your session ended")
    expect(connection.locator("a")).to_have_text("log in again")


def test_an_operation_name_with_markup_is_shown_as_text(page: Page, server: Any) -> None:
    log_in(page, server, "ada")
    tokens = [hostile(i) for i in range(5)]
    wait_all(tokens)
    row = page.locator("#guard tbody tr").filter(has_text=XSS_NAME)
    expect(row).to_have_count(1, timeout=TIMEOUT_MS)
    assert row.get_attribute("data-operation") == XSS_NAME
    assert XSS_NAME in (row.locator("[data-field=operation]").text_content() or "")
    expect(page.locator("#recent tbody tr").filter(has_text=XSS_NAME).first).to_be_visible()
    assert page.locator("#guard script, #recent script").count() == 0
    assert page.evaluate("() => typeof window.__xss") == "undefined"


def _seed_quarantine(coordinator: OperationsCoordinator) -> None:
    store = coordinator.guard_house.quarantine
    for i, op in enumerate(["browser_double", "browser_double", "browser_flaky"]):
        store.add(
            9000 + i,
            op,
            double,
            (i,),
            {},
            predicted=2.0,
            baseline=0.01,
            deviation=200.0,
            threshold=10.0,
            reason=f"predicted 2 s, 200x the baseline (seeded {i})",
        )


def test_quarantine_preview_then_discard_exactly_what_it_listed(
    page: Page, server: Any, coordinator: OperationsCoordinator
) -> None:
    _seed_quarantine(coordinator)
    log_in(page, server, "otto")
    expect(page.locator("#quarantine tbody tr")).to_have_count(3, timeout=TIMEOUT_MS)
    page.fill("#quarantine-operation", "browser_double")
    page.click("#quarantine-preview-btn")
    expect(page.locator("#quarantine-preview")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#quarantine-preview-list li")).to_have_count(2)
    expect(page.locator("#quarantine-discard-btn")).to_have_text("Discard 2")
    assert len(coordinator.guard_house.quarantined()) == 3  # a preview touches nothing
    # A record of the same operation quarantined after the preview is not part of it.
    late = coordinator.guard_house.quarantine.add(
        9100,
        "browser_double",
        double,
        (7,),
        {},
        predicted=2.0,
        baseline=0.01,
        deviation=200.0,
        threshold=10.0,
        reason="quarantined after the preview",
    )
    page.click("#quarantine-discard-btn")
    expect(page.locator("#message")).to_have_attribute("data-outcome", "ok", timeout=TIMEOUT_MS)
    expect(page.locator("#message")).to_contain_text("discarded 2")
    expect(page.locator("#quarantine-preview")).to_be_hidden()
    expect(page.locator("#quarantine tbody tr")).to_have_count(2, timeout=TIMEOUT_MS)
    left = coordinator.guard_house.quarantined()
    assert sorted(r.record_id for r in left if r.operation_type == "browser_double") == [
        late.record_id
    ]
    assert [r.operation_type for r in left].count("browser_flaky") == 1


def test_screenshot_of_the_live_dashboard(
    page: Page, server: Any, coordinator: OperationsCoordinator, output_dir: Path
) -> None:
    coordinator.register_launchable(crunch)
    _seed_quarantine(coordinator)
    stop = threading.Event()
    thread = threading.Thread(
        target=run_workload,
        args=(coordinator,),
        kwargs={"stop": stop, "seed": 7},
        name="browser-test-workload",
        daemon=True,
    )
    thread.start()
    try:
        log_in(page, server, "ada")
        # The admin's set-limit form: one hash_blob at a time, so some wait (queued).
        expect(page.locator('#guard tr[data-operation="hash_blob"]')).to_be_visible(
            timeout=TIMEOUT_MS
        )
        page.select_option("#limit-operation", "hash_blob")
        page.fill("#limit-max", "1")
        page.click("#limit-btn")
        expect(page.locator("#message")).to_have_attribute("data-outcome", "ok")
        expect(
            page.locator('#guard tr[data-operation="hash_blob"] [data-field=limit]')
        ).to_have_text("max 1", timeout=TIMEOUT_MS)
        expect(page.locator("#queued tbody tr").first).to_be_visible(timeout=TIMEOUT_MS)
        # The admin's launch box: a registered function with JSON arguments.
        page.fill("#launch-args", '[1000, "demo"]')
        page.click("#launch-btn")
        expect(page.locator("#message")).to_have_attribute("data-outcome", "ok")
        assert int(page.input_value("#token-id")) > 0  # the launched token's id
        # Enough one-second points for the charts to show lines, and every panel filled.
        page.wait_for_function(
            "() => { const s = window.tokengate.snapshot();"
            " return s && s.series && s.series.t.length >= 8 && s.recent.length >= 50; }",
            timeout=15_000,
        )
        expect(page.locator("#affinity tbody tr")).to_have_count(coordinator.cores)
        expect(page.locator("#launch-name")).to_have_value("crunch")
        expect(page.locator("#throughput-summary")).to_contain_text("completed")
        page.mouse.click(1, 1)  # no focus ring in the picture
        shot = output_dir / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        stop.set()
        thread.join(timeout=20)
    assert shot.stat().st_size > 20_000
    docs_image = Path(__file__).resolve().parents[1] / "docs" / "images" / "dashboard.png"
    if os.environ.get("TOKENGATE_UPDATE_SCREENSHOT") == "1":
        docs_image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, docs_image)


def _wait_for_event(name: str) -> str:
    """A task that waits on the cluster for the ``distributed.Event`` ``name``."""
    from distributed import Event

    Event(name).wait(60)
    return name


def test_a_dask_backend_shows_its_cluster_and_kills_a_token_running_there(
    page: Page, users: dict[str, tuple[str, str]], tmp_path: Path
) -> None:
    distributed = pytest.importorskip(
        "distributed", reason="needs dask[distributed]: pip install 'tokengate[dask]'"
    )
    from tokengate.backends import DaskBackend

    cluster = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        # Dask's HTTP servers (health, metrics) would listen on every interface otherwise.
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
    )
    client = distributed.Client(cluster, set_as_default=False)
    coord = OperationsCoordinator(backend=DaskBackend(client))
    coord.start()
    srv = serve(
        coord, "127.0.0.1", 0, users=users, audit_log=tmp_path / "audit.jsonl", update_interval=0.1
    )
    name = f"browser-{os.getpid()}-{id(page)}"
    try:
        log_in(page, srv, "otto")
        badge = page.locator("#system [data-field=backend]")
        expect(badge).to_contain_text(f"dask {cluster.scheduler_address}", timeout=TIMEOUT_MS)
        expect(badge).to_contain_text("1 worker · 2 threads · 0/4 in flight")
        wait_all([double(i) for i in range(10)])
        expect(pool(page, "completed")).to_have_text("10", timeout=TIMEOUT_MS)

        waiting = task_token_guard(operation_type="browser_wait")(_wait_for_event)(name)
        expect(badge).to_contain_text("1/4 in flight", timeout=TIMEOUT_MS)
        expect(pool(page, "executing")).to_have_text("1")
        page.fill("#token-id", str(waiting.token_id))
        page.click("#kill-btn")
        expect(page.locator("#message")).to_have_attribute("data-outcome", "ok", timeout=TIMEOUT_MS)
        expect(badge).to_contain_text("0/4 in flight", timeout=TIMEOUT_MS)
        expect(pool(page, "killed")).to_have_text("1", timeout=TIMEOUT_MS)
        assert waiting.state == TokenState.KILLED
    finally:
        distributed.Event(name, client=client).set()
        srv.close()
        coord.stop(timeout=10)
        client.close()
        cluster.close()
