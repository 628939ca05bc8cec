"""The three ways a user asks for a backend around a call, for tests of code that caches a backend choice
(the kept calls of ember.nn, nn/_kept_call.py): each must be seen by the very next call."""
import ember


def under_each_backend_route(name: str, monkeypatch, check) -> None:
    """``check(why)`` under ``with ember.backend(name)``, ``ember.set_backend(name)`` and
    ``EMBER_BACKEND=name`` in turn; each route is undone before the next."""
    with ember.backend(name):
        check("with ember.backend")
    ember.set_backend(name)
    try:
        check("set_backend")
    finally:
        ember.set_backend(None)
    monkeypatch.setenv("EMBER_BACKEND", name)
    try:
        check("EMBER_BACKEND")
    finally:
        monkeypatch.delenv("EMBER_BACKEND")
