"""logsink/errors.py: the one errno/code -> exception mapping and the one ConfigError."""

from __future__ import annotations

import errno

import pytest

from logsink import access, config, errors, forward, protocol
from logsink._native import check


class TestErrorFor:
    @pytest.mark.parametrize("err, cls", [(errno.ETIMEDOUT, TimeoutError), (errno.ECONNRESET, ConnectionError),
                                          (errno.ESHUTDOWN, ConnectionError), (errno.EPIPE, ConnectionError),
                                          (errno.EACCES, PermissionError), (errno.EPERM, PermissionError),
                                          (errno.EINVAL, ValueError), (errno.EMSGSIZE, ValueError)])
    def test_api_errors_get_their_kind_and_the_sentence_as_message(self, err, cls):
        """With a sentence for the user, the class says the kind of failure and str() is the sentence itself."""
        exc = errors.error_for(-err, "write", "the daemon said no: do this")
        assert isinstance(exc, cls) and str(exc) == "the daemon said no: do this"
        if isinstance(exc, OSError):
            assert exc.errno == err

    def test_internal_failures_are_oserror_with_what_and_strerror(self):
        """Without a sentence (an internal call failed) it is OSError(errno, '<what>: <strerror>', filename), as check() raised before."""
        exc = errors.error_for(-errno.ENOENT, "registering the stream", filename="/x")
        assert isinstance(exc, FileNotFoundError) and exc.errno == errno.ENOENT and exc.filename == "/x"
        assert exc.strerror == "registering the stream: No such file or directory"

    def test_other_errnos_with_a_sentence_keep_what_in_front(self):
        """An errno of no special kind keeps '<what>: <why>' and its errno."""
        exc = errors.error_for(-errno.EIO, "flush", "disk full")
        assert type(exc) is OSError and exc.errno == errno.EIO and exc.strerror == "flush: disk full"

    def test_kind_overrides_the_class(self):
        """A caller that knows better (a timeout while connecting is a ConnectionError) picks the class."""
        exc = errors.error_for(-errno.ETIMEDOUT, "connect", "no answer", kind=ConnectionError)
        assert type(exc) is ConnectionError and str(exc) == "no answer"

    def test_native_check_uses_the_mapping(self):
        """_native.check raises what error_for gives for a -errno and passes results through."""
        assert check(7, "x") == 7
        with pytest.raises(PermissionError, match=r"binding: Permission denied"):
            check(-errno.EACCES, "binding")


class TestExceptionForCode:
    def test_forbidden_is_a_permission_error(self):
        """ERROR forbidden (the access rules) becomes a PermissionError, as the C producer's -EACCES."""
        exc = errors.exception_for_code(protocol.E_FORBIDDEN, "no")
        assert isinstance(exc, PermissionError) and exc.errno == errno.EACCES and str(exc) == "no"

    @pytest.mark.parametrize("code", [protocol.E_SHUTTING_DOWN, protocol.E_BAD_STREAM, "a-code-from-the-future"])
    def test_other_codes_are_connection_errors(self, code):
        """Every other refusal is a ConnectionError."""
        assert isinstance(errors.exception_for_code(code, "refused"), ConnectionError)


class TestOneConfigError:
    def test_config_forward_and_access_share_one_config_error(self):
        """config, forward and access errors are all the one errors.ConfigError (still ValueErrors)."""
        assert config.ConfigError is errors.ConfigError
        assert issubclass(forward.ForwardConfigError, errors.ConfigError)
        assert issubclass(errors.ConfigError, ValueError)

    def test_bad_access_rule_raises_config_error_with_its_message(self):
        """A bad [access] value raises ConfigError naming the setting (the message is unchanged)."""
        with pytest.raises(errors.ConfigError, match=r"access.trust_root must be true or false"):
            access.rules_from_config({"trust_root": "maybe"}, None, None)

    def test_bad_forward_setting_raises_config_error(self):
        """A bad forward setting raises a ConfigError with its message."""
        with pytest.raises(errors.ConfigError, match=r"spool_max must be a size"):
            config.parse_size("lots", "spool_max")  # forward specs are parsed by the config
