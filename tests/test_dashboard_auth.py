"""Users, password hashes, sessions, CSRF tokens and the login throttle of the dashboard
(tokengate.dashboard.auth)."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("flask_socketio")

from argon2 import PasswordHasher

from tokengate.dashboard import ROLES, auth, hash_password, verify_password
from tokengate.errors import ConfigurationError

# Cheap argon2id hashes: valid hashes whose verification takes microseconds, not 0.2 s.
_fast = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
H_ALICE = _fast.hash("alice-pw")
H_BOB = _fast.hash("bob-pw")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


def test_roles_are_ordered():
    assert ROLES == ("viewer", "operator", "admin")
    assert auth.role_at_least("admin", "operator")
    assert auth.role_at_least("operator", "operator")
    assert not auth.role_at_least("viewer", "operator")


def test_hash_and_verify():
    h = hash_password("s3cret")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "s3cret")
    assert not verify_password(h, "wrong")
    assert not verify_password("not a hash", "s3cret")
    assert not verify_password(h, "x" * (auth.MAX_PASSWORD + 1))
    with pytest.raises(ConfigurationError):
        hash_password("")


def test_env_format_with_both_separators():
    text = f"alice:admin:{H_ALICE}; bob:viewer:{H_BOB}\n"
    users = auth.parse_users(text)
    assert set(users) == {"alice", "bob"}
    assert users["alice"].role == "admin" and users["alice"].check("alice-pw")
    assert users["bob"].role == "viewer"
    assert H_ALICE not in repr(users["alice"])  # the hash is not shown
    assert set(auth.parse_users(f"alice:admin:{H_ALICE}\nbob:viewer:{H_BOB}")) == {"alice", "bob"}


def test_env_format_refusals():
    with pytest.raises(ConfigurationError, match=r"not name:role:hash"):
        auth.parse_users("alice:admin")
    with pytest.raises(ConfigurationError, match=r"unknown role 'root'.*viewer, operator, admin"):
        auth.parse_users(f"alice:root:{H_ALICE}")
    with pytest.raises(ConfigurationError, match=r"'alice'.*plain text.*hash-password"):
        auth.parse_users("alice:admin:hunter2")
    with pytest.raises(ConfigurationError, match="not a valid argon2 hash"):
        auth.parse_users("alice:admin:$argon2id$garbage")
    with pytest.raises(ConfigurationError, match="given twice"):
        auth.parse_users(f"alice:admin:{H_ALICE};alice:viewer:{H_BOB}")
    with pytest.raises(ConfigurationError, match="user name"):
        auth.parse_users(f"al ice:admin:{H_ALICE}")
    with pytest.raises(ConfigurationError, match="no users"):
        auth.parse_users(" ; ")


def test_toml_file(tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(
        f'[users.alice]\nrole = "admin"\npassword_hash = "{H_ALICE}"\n'
        f'[users.bob]\nrole = "operator"\npassword_hash = "{H_BOB}"\n'
    )
    users = auth.load_users_file(path)
    assert {n: u.role for n, u in users.items()} == {"alice": "admin", "bob": "operator"}
    assert users["bob"].check("bob-pw")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('[users.alice]\nrole = "admin"\npassword = "hunter2"\n', r"'alice'.*plain text"),
        ('[users.alice]\nrole = "admin"\npassword_hash = "hunter2"\n', r"'alice'.*plain text"),
        (f'[users.alice]\nrole = "boss"\npassword_hash = "{H_ALICE}"\n', "unknown role 'boss'"),
        (f'[users.alice]\nrole = "admin"\npassword_hash = "{H_ALICE}"\nx = 1\n', "unknown keys"),
        ("[users]\n", "no \\[users.NAME\\]"),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_toml_refusals(tmp_path, body, match):
    path = tmp_path / "users.toml"
    path.write_text(body)
    with pytest.raises(ConfigurationError, match=match):
        auth.load_users_file(path)


def test_a_missing_users_file(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read the users file"):
        auth.load_users_file(tmp_path / "none.toml")


def test_precedence(tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(f'[users.file]\nrole = "viewer"\npassword_hash = "{H_BOB}"\n')
    env = {
        auth.ENV_USERS: f"envuser:operator:{H_ALICE}",
        auth.ENV_USERS_FILE: str(path),
    }
    users, generated = auth.resolve_users({"arg": ("admin", H_ALICE)}, path, env)
    assert set(users) == {"arg"} and generated is None
    assert set(auth.resolve_users(f"s:viewer:{H_BOB}", path, env)[0]) == {"s"}
    assert set(auth.resolve_users(None, path, env)[0]) == {"file"}
    assert set(auth.resolve_users(None, None, env)[0]) == {"envuser"}
    assert set(auth.resolve_users(None, None, {auth.ENV_USERS_FILE: str(path)})[0]) == {"file"}
    with pytest.raises(ConfigurationError, match="unknown role"):
        auth.resolve_users({"x": ("god", H_ALICE)})
    with pytest.raises(ConfigurationError, match="plain text"):
        auth.resolve_users({"x": ("admin", "hunter2")})
    with pytest.raises(ConfigurationError, match=r"\(role, password_hash\)"):
        auth.resolve_users({"x": "admin"})


def test_no_users_generates_an_admin_password_logged_once(caplog):
    with caplog.at_level(logging.WARNING, "tokengate.dashboard"):
        users, password = auth.resolve_users(None, None, {})
    assert password is not None and len(password) >= 16
    assert list(users) == ["admin"] and users["admin"].role == "admin"
    assert users["admin"].check(password)
    records = [r for r in caplog.records if "no dashboard users are configured" in r.message]
    assert len(records) == 1
    assert f"log in as 'admin' with password {password}" in records[0].message
    # a second configuration makes another password
    with caplog.at_level(logging.WARNING, "tokengate.dashboard"):
        _, other = auth.resolve_users(None, None, {})
    assert other != password


def test_authenticate_same_answer_for_unknown_user_and_wrong_password():
    users = auth.parse_users(f"alice:admin:{H_ALICE}")
    assert auth.authenticate(users, "alice", "alice-pw") is users["alice"]
    assert auth.authenticate(users, "alice", "nope") is None
    assert auth.authenticate(users, "mallory", "alice-pw") is None


def test_sessions_expire_on_the_injected_clock():
    clock = FakeClock()
    store = auth.SessionStore(lifetime=100.0, clock=clock)
    sid, session = store.create("alice", "admin")
    assert session.key != sid and sid not in repr(session)
    assert store.get(sid) == session
    assert store.get("forged") is None
    assert store.get(None) is None
    clock.advance(99.9)
    assert store.get(sid) is not None
    clock.advance(0.1)
    assert store.get(sid) is None
    assert len(store) == 0


def test_sessions_are_bounded_and_dropped():
    store = auth.SessionStore(lifetime=100.0, clock=FakeClock(), max_sessions=3)
    made = [store.create(f"u{i}", "viewer")[0] for i in range(5)]
    assert len(store) == 3
    assert store.get(made[0]) is None and store.get(made[4]) is not None
    assert store.drop(made[4]) is not None
    assert store.get(made[4]) is None
    assert store.drop(made[4]) is None


def test_login_csrf_tokens():
    secret = b"k" * 32
    token = auth.login_csrf_token(secret, "nonce")
    assert auth.check_login_csrf(secret, "nonce", token)
    assert not auth.check_login_csrf(secret, "other", token)
    assert not auth.check_login_csrf(b"x" * 32, "nonce", token)
    assert not auth.check_login_csrf(secret, None, token)
    assert not auth.check_login_csrf(secret, "nonce", "")
    assert auth.same_token("abc", "abc")
    assert not auth.same_token("abc", "abd")
    assert not auth.same_token("abc", None)
    assert not auth.same_token("abc", 123)


def test_throttle_locks_after_five_failures_within_a_minute():
    clock = FakeClock()
    throttle = auth.LoginThrottle(clock)
    for _ in range(4):
        assert throttle.failure("1.2.3.4") is False
        clock.advance(10)
    assert throttle.locked_for("1.2.3.4") is None
    assert throttle.failure("1.2.3.4") is True  # the fifth within 60 s
    assert throttle.locked_for("1.2.3.4") == pytest.approx(60.0)
    assert throttle.locked_for("5.6.7.8") is None  # another client is not affected
    assert throttle.failure("1.2.3.4") is False  # already locked: not a new lockout
    clock.advance(59.5)
    assert throttle.locked_for("1.2.3.4") == pytest.approx(0.5)
    clock.advance(0.5)
    assert throttle.locked_for("1.2.3.4") is None


def test_throttle_forgets_old_failures_by_time_only():
    clock = FakeClock()
    throttle = auth.LoginThrottle(clock)
    for _ in range(4):
        throttle.failure("c")
    clock.advance(61)  # the four are out of the window
    assert throttle.failure("c") is False
    for _ in range(3):
        throttle.failure("c")
    assert throttle.reserve("c") is None  # 4 failures: a 5th attempt may be checked
    assert throttle.release("c", failed=False) is False  # it succeeded
    # a success does not clear the address's failures (M2): the next failure locks
    assert throttle.failure("c") is True


def test_throttle_reserves_attempts_before_they_are_checked():
    """Parallel attempts: the budget counts the attempts in flight (H1)."""
    clock = FakeClock()
    throttle = auth.LoginThrottle(clock)
    assert throttle.failure("c") is False
    for _ in range(4):
        assert throttle.reserve("c") is None  # 1 failure + 4 in flight = 5
    refusal = throttle.reserve("c")
    assert refusal is not None and not refusal.locked and refusal.audit
    again = throttle.reserve("c")
    assert again is not None and not again.audit  # audited once per burst
    assert throttle.check("c") is not None
    assert throttle.reserve("other") is None  # another address is not affected
    results = [throttle.release("c", failed=True) for _ in range(4)]
    assert results == [False, False, False, True]  # the 5th failure starts the lockout
    locked = throttle.reserve("c")
    assert locked is not None and locked.locked and locked.audit  # first of this lockout
    assert locked.wait == pytest.approx(60.0)
    assert not throttle.reserve("c").audit
    clock.advance(60)
    assert throttle.reserve("c") is None  # the lockout is over, the failures with it
    throttle.release("c", failed=False)
    assert throttle.check("c") is None


def test_a_cancelled_reservation_is_no_failure():
    throttle = auth.LoginThrottle(FakeClock())
    for _ in range(10):
        assert throttle.reserve("c") is None
        assert throttle.release("c", failed=False) is False
    assert throttle.check("c") is None and throttle.locked_for("c") is None


def test_verification_slots_bound_and_time_out():
    slots = auth.VerificationSlots(2, wait=0.01)
    assert slots.acquire() and slots.acquire()
    assert not slots.acquire()  # both taken: gives up after `wait`
    slots.release()
    assert slots.acquire()
    slots.release()
    slots.release()
    assert auth.VERIFICATIONS.slots == auth.VERIFY_SLOTS == 2
    with pytest.raises(ConfigurationError):
        auth.VerificationSlots(0)


def test_sessions_are_capped_per_user():
    """One account logging in again and again drops its own oldest sessions, not the
    others' (L1)."""
    store = auth.SessionStore(lifetime=100.0, clock=FakeClock(), max_sessions=30, max_per_user=3)
    admin = store.create("ada", "admin")[0]
    mine = [store.create("vera", "viewer")[0] for _ in range(25)]
    assert store.get(admin) is not None
    assert [store.get(m) is not None for m in mine[-4:]] == [False, True, True, True]
    assert len(store) == 4
    assert auth.SessionStore(1.0)._max_per_user == auth.MAX_SESSIONS_PER_USER == 20
