import pytest

from cipherpool import errors
from cipherpool.messages import failed, ok, unwrap


def all_error_classes():
    seen, todo = [], [errors.CipherpoolError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_round_trips_over_the_wire_as_its_own_class(cls):
    # Given an error raised on a platform process
    envelope = failed(cls("what to do"))
    # When the client unwraps the result
    with pytest.raises(cls) as caught:
        unwrap(envelope)
    # Then it is the same class with the same message, and the exit code of its family
    assert type(caught.value) is cls
    assert caught.value.message == "what to do"
    assert caught.value.exit_code == family_exit_code(cls)


# The README's promise: one exit code per family, whatever the class below it.
FAMILY_EXIT_CODES = {
    errors.ConfigurationError: 2,
    errors.AuthError: 3,
    errors.NotFound: 4,
    errors.Conflict: 5,
    errors.InvalidInput: 6,
    errors.PlatformError: 7,
    errors.LimitExceeded: 8,
}


def family_exit_code(cls: type) -> int:
    families = [code for family, code in FAMILY_EXIT_CODES.items() if issubclass(cls, family)]
    assert len(families) <= 1, f"{cls.__name__} is in two families"
    return families[0] if families else 1  # only the root itself, outside every family


def test_every_error_but_the_root_belongs_to_a_family():
    orphans = [
        c.__name__
        for c in all_error_classes()
        if c is not errors.CipherpoolError and not any(issubclass(c, family) for family in FAMILY_EXIT_CODES)
    ]
    assert orphans == []


def test_codes_are_unique():
    codes = [c.code for c in all_error_classes()]
    assert len(codes) == len(set(codes))


def test_unknown_code_becomes_remote_error():
    with pytest.raises(errors.RemoteError):
        unwrap({"ok": False, "error": {"code": "no_such_code", "message": "x"}})


def test_ok_envelope_returns_value_and_garbage_is_refused():
    assert unwrap(ok({"a": 1})) == {"a": 1}
    with pytest.raises(errors.RemoteError):
        unwrap("not an envelope")
