"""Maildrops: the one storage interface (`Maildrop`) and its backends, Maildir
and mbox. Only this package knows storage formats: a location is parsed here
(`location.MaildropLocation`), opened here (`location.open_maildrop`), and
mail is delivered here (`delivery.deliver`)."""

from ._base import UID_MAX_LEN, Maildrop, MaildropSettings, MessageInfo, MessageList, is_valid_uid

__all__ = ["UID_MAX_LEN", "Maildrop", "MaildropSettings", "MessageInfo", "MessageList", "is_valid_uid"]
