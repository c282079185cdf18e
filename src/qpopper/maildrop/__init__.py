"""Maildrop backends behind one interface: Maildir today, mbox next."""

from ._base import Maildrop, MaildropSettings, MessageInfo, MessageList, is_valid_uid, UID_MAX_LEN

__all__ = ["Maildrop", "MaildropSettings", "MessageInfo", "MessageList", "is_valid_uid", "UID_MAX_LEN"]
