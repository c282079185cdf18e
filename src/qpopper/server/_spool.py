"""From settings and an authenticated user to a maildrop location and the
backend settings for this one session.

qpopper's spool rules apply to system users whose mail location was not set
explicitly: `<spool-dir>/<user>`, hashed spool directories (hash-spool 1
or 2), or `~/<home-dir-mail>`. Server mode may differ per group
(group-server-mode, group-no-server-mode).
"""

from __future__ import annotations

import dataclasses
import grp
import os

from ..auth import Principal
from ..config.options import Options
from ..maildrop import MaildropSettings
from ..maildrop.spoolpath import hash_dirs, make_hash_dirs, spool_path


def _in_group(principal: Principal, group: str | None) -> bool:
    if not group:
        return False
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    return principal.gid == entry.gr_gid or principal.user in entry.gr_mem


# The settings of the last Options that named no per-user rule, and those
# Options: most sites have one Options object for every session, so the
# login path builds no settings object at all (see maildrop_settings).
_shared: tuple[Options, MaildropSettings] | None = None


def maildrop_settings(options: Options, principal: Principal) -> MaildropSettings:
    """The backend settings of this session: the options' own, unless a
    group's server mode or a hashed temp directory makes them the user's."""
    global _shared  # noqa: PLW0603 - a one-entry cache, replaced whole
    per_user = options.group_server_mode or options.group_no_server_mode or (options.temp_dir and options.hash_spool)
    if not per_user:
        shared = _shared
        if shared is None or shared[0] is not options:
            shared = _shared = (options, _settings(options, options.server_mode, options.temp_dir))
        return shared[1]
    server_mode = options.server_mode
    if _in_group(principal, options.group_server_mode):
        server_mode = True
    if _in_group(principal, options.group_no_server_mode):
        server_mode = False
    temp_dir = options.temp_dir
    if temp_dir and options.hash_spool:
        parts = hash_dirs(principal.user, options.hash_spool)
        make_hash_dirs(temp_dir, parts)
        temp_dir = os.path.join(temp_dir, *parts)
    return _settings(options, server_mode, temp_dir)


def _settings(options: Options, server_mode: bool, temp_dir: str | None) -> MaildropSettings:
    return MaildropSettings(
        server_mode=server_mode,
        fast_update=options.fast_update,
        keep_temp_drop=options.keep_temp_drop,
        temp_dir=temp_dir,
        temp_name=options.temp_name,
        update_status_headers=options.update_status_headers,
        uw_kluge=options.uw_kluge,
        shared_storage=options.shared_storage,
    )


def resolve_spool(options: Options, principal: Principal) -> Principal:
    """The principal with qpopper's spool path filled in, where it applies."""
    if not options.system_users or "mail_location" in options.sources:
        return principal
    path = spool_path(
        principal.user,
        spool_dir=options.spool_dir,
        hash_spool=options.hash_spool,
        home_dir_mail=options.home_dir_mail,
        home=principal.home,
        check_hash_dir=options.check_hash_dir,
    )
    return dataclasses.replace(principal, mail=f"mbox:{path}")
