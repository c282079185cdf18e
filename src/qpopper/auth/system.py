"""System users: Unix accounts checked through PAM, qpopper's home ground.

The password goes to PAM (service `pop3` by default; the repository ships
packaging/pam.d/pop3), which also runs the account stage, so expired and
locked accounts are refused the way login(1) refuses them. Root and system
accounts (uid below `min-uid`) never log in by POP. Logins proved by other
means (APOP or SCRAM against the APOP database) are checked against the
shadow entry instead: a locked or expired account is refused there too.

PAM is slow and blocking by design; the server runs this off its event
loop, in the process that will serve the session. What does not change
from one login to the next (libpam, the service's modules) is loaded once,
when the authenticator is made in the long-lived parent (`pamresident`).
"""

from __future__ import annotations

import logging
import pwd
import time

from ..errors import AuthUnavailable
from ..maildrop.location import expand_location
from ..usernames import is_valid_username
from . import Authenticator, AuthTuning, Principal, Reloadable
from .credentials import Credentials, UserPass, Verified
from .pamresident import ResidentPam

log = logging.getLogger("qpopper.auth")

DEFAULT_PAM_SERVICE = "pop3"
DEFAULT_MIN_UID = 1000
SHADOW_FILE = "/etc/shadow"


def shadow_refusal(user: str, shadow_file: str = SHADOW_FILE, today: int | None = None) -> str | None:
    """Why the shadow entry forbids a login (locked, expired), or None."""
    try:
        with open(shadow_file, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise AuthUnavailable(f"cannot read {shadow_file}: {exc.strerror}") from None
    today = int(time.time() // 86400) if today is None else today
    for line in lines:
        fields = line.split(":")
        if len(fields) < 9 or fields[0] != user:
            continue
        password, last_change, _min, max_age, _warn, inactive, expire = fields[1:8]
        if password.startswith("!"):
            return "account is locked"
        if expire.isdigit() and today >= int(expire):
            return "account has expired"
        if last_change == "0":
            return "password must be changed first"
        if last_change.isdigit() and max_age.isdigit():
            deadline = int(last_change) + int(max_age)
            if inactive.isdigit():
                deadline += int(inactive)
            if today > deadline:
                return "password has expired"
        return None
    return "no shadow entry"


class SystemAuthenticator(Authenticator, Reloadable):
    """Unix accounts through PAM; maildrops from a template (qpopper's
    /var/mail/USER by default)."""

    def __init__(
        self,
        mail_location: str = "mbox:/var/mail/%u",
        *,
        service: str = DEFAULT_PAM_SERVICE,
        min_uid: int = DEFAULT_MIN_UID,
        shadow_file: str = SHADOW_FILE,
    ) -> None:
        import pam  # python-pam; imported here so virtual-user sites need no libpam

        self._pam = pam
        self.mail_location = mail_location
        self.service = service
        self.min_uid = min_uid
        self.shadow_file = shadow_file
        try:
            # python-pam finds libpam on its first use (ctypes' find_library, which runs
            # ldconfig twice): done here, once, instead of in every session process.
            pam.pam()
            self._resident = ResidentPam(service)
        except (OSError, AttributeError) as exc:  # no libpam: say so at start-up, not at each login
            raise ImportError(f"cannot load libpam: {exc}") from None
        self._resident.open()

    def reload(self, tuning: AuthTuning | None = None) -> None:
        """SIGHUP: load the service's modules afresh (an upgraded module is used from
        the next session on; the service file itself is read at every login anyway).
        PAM hashes in the session process: `tuning` has nothing to size here."""
        self._resident.open()

    def _account(self, user: str) -> pwd.struct_passwd | None:
        if not is_valid_username(user):
            return None
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return None
        if entry.pw_uid == 0 or entry.pw_uid < self.min_uid:
            log.warning("login of %s refused: uid %d is below min-uid %d", user, entry.pw_uid, self.min_uid)
            return None
        return entry

    def authenticate(self, credentials: Credentials) -> Principal | None:
        entry = self._account(credentials.user)
        if isinstance(credentials, UserPass):
            if b"\0" in credentials.password:
                # PAM's conversation carries C strings (python-pam raises on a NUL):
                # no Unix password holds one.
                return None
            handle = self._pam.pam()
            ok = handle.authenticate(
                credentials.user, credentials.password, service=self.service, resetcreds=False
            )
            if not ok:
                if entry is not None:
                    log.info("PAM refused %s: %s", credentials.user, handle.reason)
                return None
        elif isinstance(credentials, Verified):
            if entry is None:
                return None
            refusal = shadow_refusal(credentials.user, self.shadow_file)
            if refusal is not None:
                log.info("login of %s refused: %s", credentials.user, refusal)
                return None
        else:
            return None
        if entry is None:
            return None
        return Principal(
            user=entry.pw_name,
            mail=expand_location(self.mail_location, entry.pw_name, entry.pw_dir),
            home=entry.pw_dir,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
        )
