"""German reply texts for LANG de (see `_lang`): the English text, with
"{}" for each variable part, and its German, naming the parts {0}, {1}..."""

from __future__ import annotations

TEXTS: dict[str, str] = {
    # LANG and UTF8
    "Language changed.": "Sprache geändert.",
    "Language listing follows:": "Liste der Sprachen folgt:",
    "Unknown language; LANG without argument lists them.": "Unbekannte Sprache; LANG ohne Argument listet alle auf.",
    "UTF8 enabled.": "UTF8 eingeschaltet.",
    # Logging in
    "Password required for {}.": "Passwort für {0} erforderlich.",
    # Counts go after a colon, so the German holds for one message as for many.
    "{} has {} visible messages (0 hidden) in {} octets.":
        "{0} hat sichtbare Nachrichten: {1} (0 verborgen), {2} Oktette.",
    "Authentication failed.": "Authentifizierung fehlgeschlagen.",
    "Authentication cancelled.": "Authentifizierung abgebrochen.",
    "Authentication is unavailable, try again later.":
        "Authentifizierung zurzeit nicht möglich, bitte später erneut versuchen.",
    "This account cannot be served; please contact support.":
        "Dieses Konto kann nicht bedient werden; bitte wenden Sie sich an den Support.",
    "Authentication exchange failed.": "Der Authentifizierungsaustausch ist fehlgeschlagen.",
    "Authentication response too long.": "Die Authentifizierungsantwort ist zu lang.",
    "Invalid base64 in authentication response.": "Ungültiges Base64 in der Authentifizierungsantwort.",
    "Invalid base64 in initial response.": "Ungültiges Base64 in der Initialantwort.",
    "This mechanism takes no initial response.": "Dieser Mechanismus nimmt keine Initialantwort an.",
    "Unsupported authentication mechanism.": "Nicht unterstützter Authentifizierungsmechanismus.",
    "List of supported mechanisms follows": "Liste der unterstützten Mechanismen folgt",
    "APOP digest must be 32 hexadecimal digits.": "Der APOP-Digest muss aus 32 Hexadezimalziffern bestehen.",
    "APOP is not enabled.": "APOP ist nicht eingeschaltet.",
    "Invalid user name.": "Ungültiger Benutzername.",
    "Invalid characters in password.": "Ungültige Zeichen im Passwort.",
    "Password is not valid UTF-8.": "Das Passwort ist kein gültiges UTF-8.",
    "USER first.": "Zuerst USER.",
    "USER/PASS is not allowed on this connection.": "USER/PASS ist auf dieser Verbindung nicht erlaubt.",
    "Maildrop is in use by another session.": "Das Postfach wird von einer anderen Sitzung benutzt.",
    "Maildrop cannot be read; please contact support.":
        "Das Postfach kann nicht gelesen werden; bitte wenden Sie sich an den Support.",
    "Minimum time between logins has not elapsed.": "Die Mindestzeit zwischen zwei Anmeldungen ist noch nicht um.",
    "Maildrop is unavailable, try again later.":
        "Das Postfach ist zurzeit nicht verfügbar, bitte später erneut versuchen.",
    # TLS
    "Begin TLS negotiation now.": "TLS-Aushandlung jetzt beginnen.",
    "TLS is already active.": "TLS ist bereits aktiv.",
    "STLS is not allowed after UTF8.": "STLS ist nach UTF8 nicht erlaubt.",
    "STLS is not available.": "STLS ist nicht verfügbar.",
    # The maildrop
    "Capability list follows": "Liste der Fähigkeiten folgt",
    "{} visible messages ({} octets)": "Sichtbare Nachrichten: {0} ({1} Oktette)",
    "uidl command accepted.": "UIDL-Befehl angenommen.",
    "Message {} has been deleted.": "Nachricht {0} wurde gelöscht.",
    "Message {} has already been deleted.": "Nachricht {0} wurde bereits gelöscht.",
    "Message {} does not exist.": "Nachricht {0} existiert nicht.",
    "Message {} has been marked for deletion.": "Nachricht {0} ist zum Löschen vorgemerkt.",
    "Parameter must be a number between 1 and {}.": "Der Parameter muss eine Zahl zwischen 1 und {0} sein.",
    "Line count must be a non-negative number.": "Die Zeilenzahl muss eine nicht negative Zahl sein.",
    "{} is the last read message.": "{0} ist die zuletzt gelesene Nachricht.",
    "Message cannot be read now.": "Die Nachricht kann zurzeit nicht gelesen werden.",
    "Unique-ids cannot be worked out now.": "Die eindeutigen IDs können zurzeit nicht ermittelt werden.",
    "Pop server at {} signing off.": "POP-Server {0} verabschiedet sich.",
    "Pop server at {} signing off ({} messages left).": "POP-Server {0} verabschiedet sich (Nachrichten übrig: {1}).",
    "Some deleted messages not removed.": "Einige gelöschte Nachrichten wurden nicht entfernt.",
    # Commands
    "Unknown command.": "Unbekannter Befehl.",
    "Command not valid in this state.": "Der Befehl ist in diesem Zustand nicht zulässig.",
    "Wrong number of arguments.": "Falsche Anzahl von Argumenten.",
    "Command line too long.": "Die Befehlszeile ist zu lang.",
    "Invalid characters in command.": "Ungültige Zeichen im Befehl.",
    "Too many bad commands; closing connection.": "Zu viele ungültige Befehle; die Verbindung wird geschlossen.",
    "Internal server error.": "Interner Serverfehler.",
    # qpopper's extensions
    "Start sending message.": "Nachricht jetzt senden.",
    "Message sent successfully.": "Nachricht erfolgreich versandt.",
    "Message too large or with over-long lines; not sent.":
        "Nachricht zu groß oder mit überlangen Zeilen; nicht versandt.",
    "XTND XMIT is disabled.": "XTND XMIT ist ausgeschaltet.",
    "XTND needs a sub-command: XMIT or XLST.": "XTND braucht einen Unterbefehl: XMIT oder XLST.",
    "Unknown XTND sub-command.": "Unbekannter XTND-Unterbefehl.",
    "Usage: XTND XLST header [message].": "Aufruf: XTND XLST header [message].",
    "Invalid header name.": "Ungültiger Name eines Kopffelds.",
    "Usage: MDEF name(command).": "Aufruf: MDEF name(command).",
    "Macro {} defined.": "Makro {0} definiert.",
    "At most {} macros.": "Höchstens {0} Makros.",
    "Macro names are at most {} characters.": "Makronamen haben höchstens {0} Zeichen.",
    "A macro may not run a macro.": "Ein Makro darf kein Makro ausführen.",
    "A macro must be a command line of printable characters.":
        "Ein Makro muss eine Befehlszeile aus druckbaren Zeichen sein.",
    "Expanded command line too long.": "Die erweiterte Befehlszeile ist zu lang.",
}
