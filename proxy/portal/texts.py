"""The portal's words in English and German, and the choice between them; no I/O.

:func:`language` picks ``de`` or ``en``: the switch's cookie first, else the best
``Accept-Language`` entry (by q-value) that is one of them, else English.
"""

from __future__ import annotations

from collections.abc import Mapping

LANGUAGES = ("en", "de")

EN: Mapping[str, str] = {
    "title": "Customer settings",
    "nav_api": "Integration API",
    "nav_defaults": "Defaults",
    "nav_usage": "Usage",
    "logout": "Log out",
    "language": "Language",
    "customer": "Customer",
    "signed_in_as": "Signed in as",
    "login_title": "Log in",
    "email": "E-mail address",
    "password": "Password",
    "repeated": "Password again",
    "login_button": "Log in",
    "login": "The e-mail address or the password is wrong.",
    "throttled": "Too many failed logins. Please wait a few minutes and try again.",
    "logged_out": "You are logged out.",
    "invite_title": "Set your password",
    "invite_intro": "You were invited to administer the customer {customer} as {email}. "
    "Choose a password of at least 10 characters.",
    "invite_button": "Set password",
    "invitation": "This invitation link is unknown, used or expired. "
    "Ask your operator for a new one.",
    "password_short": "The password must have at least 10 characters.",
    "password_long": "The password is too long.",
    "password_mismatch": "The two passwords differ.",
    "password_set": "Your password is set. You can log in now.",
    "csrf": "The form had expired. Please try again.",
    "storage": "The change could not be saved. Please try again in a moment.",
    "api_intro": "Here you enable or disable the whole Integration API. "
    "When it is enabled, all credentials are shown.",
    "api_state": "Integration API",
    "api_on": "enabled",
    "api_off": "disabled",
    "api_enable": "Enable the Integration API",
    "api_disable": "Disable the Integration API",
    "api_off_note": "While the API is disabled, every call answers apiNotEnabled "
    "and no credentials are shown.",
    "api_url": "API URL",
    "secrets": "Secrets",
    "secret": "Secret",
    "expires": "Valid until",
    "never": "no end",
    "copy_label": "Copy",
    "copied": "Copied",
    "rotate": "Create a new secret",
    "rotate_note": "The new secret is shown at once; the old one keeps working for 7 days, "
    "so you can change your systems without an interruption.",
    "rotated": "A new secret was created. The previous one is valid until the date shown.",
    "changed": "Saved.",
    "guide_title": "Connecting Moodle, Greenlight or any BBB plugin",
    "guide_1": "Choose BigBlueButton as the server type and enter the API URL above "
    "as the server URL (some plugins call it \u201cBigBlueButton URL\u201d).",
    "guide_2": "Enter the secret above as the shared secret (\u201csecret salt\u201d).",
    "guide_3": "Save and create a test meeting; nothing else needs to change.",
    "defaults_intro": "These values are used when a meeting is created without "
    "maxParticipants or without duration.",
    "default_max_participants": "Default maximum of participants",
    "default_max_participants_help": "A meeting without maxParticipants reserves this many "
    "of your connections for as long as it runs.",
    "default_duration": "Default duration (minutes)",
    "default_duration_help": "A meeting without duration is protected for this many minutes; "
    "after that it keeps running, but its connections may be given to a new meeting "
    "when your subscription is full.",
    "save": "Save",
    "whole_number": "Please enter a whole number of at least 1.",
    "above_subscription": "This is more than your subscription ({max} connections).",
    "too_long": "Please enter at most {max} minutes.",
    "usage_intro": "Your subscription and the meetings running now.",
    "subscription": "Subscription",
    "connections": "connections",
    "reserved_now": "Reserved now",
    "meetings": "Running meetings",
    "no_meetings": "No meeting is running.",
    "meeting": "Meeting",
    "participants": "Participants reserved",
    "reserved_until": "Reserved until",
    "overtime": "Overtime since",
    "status": "Status",
    "reserved": "reserved",
    "in_overtime": "overtime",
    "updated": "As of",
    "refresh": "Refresh",
    "not_found": "This page does not exist.",
}

DE: Mapping[str, str] = {
    "title": "Kundeneinstellungen",
    "nav_api": "Integrations-API",
    "nav_defaults": "Standardwerte",
    "nav_usage": "Nutzung",
    "logout": "Abmelden",
    "language": "Sprache",
    "customer": "Kunde",
    "signed_in_as": "Angemeldet als",
    "login_title": "Anmelden",
    "email": "E-Mail-Adresse",
    "password": "Passwort",
    "repeated": "Passwort wiederholen",
    "login_button": "Anmelden",
    "login": "E-Mail-Adresse oder Passwort ist falsch.",
    "throttled": "Zu viele fehlgeschlagene Anmeldungen. Bitte warten Sie einige Minuten.",
    "logged_out": "Sie sind abgemeldet.",
    "invite_title": "Passwort festlegen",
    "invite_intro": "Sie wurden eingeladen, den Kunden {customer} als {email} zu verwalten. "
    "Wählen Sie ein Passwort mit mindestens 10 Zeichen.",
    "invite_button": "Passwort festlegen",
    "invitation": "Dieser Einladungslink ist unbekannt, schon benutzt oder abgelaufen. "
    "Bitten Sie Ihren Betreiber um einen neuen.",
    "password_short": "Das Passwort muss mindestens 10 Zeichen haben.",
    "password_long": "Das Passwort ist zu lang.",
    "password_mismatch": "Die beiden Passwörter sind verschieden.",
    "password_set": "Ihr Passwort ist festgelegt. Sie können sich jetzt anmelden.",
    "csrf": "Das Formular war abgelaufen. Bitte versuchen Sie es noch einmal.",
    "storage": "Die Änderung konnte nicht gespeichert werden. "
    "Bitte versuchen Sie es gleich noch einmal.",
    "api_intro": "Hier schalten Sie die gesamte Integrations-API ein oder aus. "
    "Ist sie eingeschaltet, werden alle Zugangsdaten angezeigt.",
    "api_state": "Integrations-API",
    "api_on": "eingeschaltet",
    "api_off": "ausgeschaltet",
    "api_enable": "Integrations-API einschalten",
    "api_disable": "Integrations-API ausschalten",
    "api_off_note": "Solange die API ausgeschaltet ist, beantwortet sie jeden Aufruf mit "
    "apiNotEnabled, und es werden keine Zugangsdaten angezeigt.",
    "api_url": "API-URL",
    "secrets": "Secrets",
    "secret": "Secret",
    "expires": "Gültig bis",
    "never": "unbegrenzt",
    "copy_label": "Kopieren",
    "copied": "Kopiert",
    "rotate": "Neues Secret erzeugen",
    "rotate_note": "Das neue Secret wird sofort angezeigt; das bisherige gilt noch 7 Tage, "
    "damit Sie Ihre Systeme ohne Unterbrechung umstellen können.",
    "rotated": "Ein neues Secret wurde erzeugt. Das bisherige gilt bis zum angezeigten Datum.",
    "changed": "Gespeichert.",
    "guide_title": "Moodle, Greenlight oder ein anderes BBB-Plugin verbinden",
    "guide_1": "Wählen Sie BigBlueButton als Servertyp und tragen Sie die API-URL oben "
    "als Server-URL ein (manche Plugins nennen sie \u201eBigBlueButton-URL\u201c).",
    "guide_2": "Tragen Sie das Secret oben als gemeinsames Secret (\u201eSecret Salt\u201c) ein.",
    "guide_3": "Speichern Sie und legen Sie ein Testmeeting an; sonst ist nichts zu ändern.",
    "defaults_intro": "Diese Werte gelten, wenn ein Meeting ohne maxParticipants oder ohne "
    "duration angelegt wird.",
    "default_max_participants": "Standard-Höchstzahl der Teilnehmenden",
    "default_max_participants_help": "Ein Meeting ohne maxParticipants reserviert so viele "
    "Ihrer Verbindungen, solange es läuft.",
    "default_duration": "Standarddauer (Minuten)",
    "default_duration_help": "Ein Meeting ohne duration ist so viele Minuten geschützt; danach "
    "läuft es weiter, aber seine Verbindungen können an ein neues Meeting gehen, wenn Ihr "
    "Kontingent voll ist.",
    "save": "Speichern",
    "whole_number": "Bitte geben Sie eine ganze Zahl ab 1 ein.",
    "above_subscription": "Das ist mehr als Ihr Kontingent ({max} Verbindungen).",
    "too_long": "Bitte geben Sie höchstens {max} Minuten ein.",
    "usage_intro": "Ihr Kontingent und die laufenden Meetings.",
    "subscription": "Kontingent",
    "connections": "Verbindungen",
    "reserved_now": "Jetzt reserviert",
    "meetings": "Laufende Meetings",
    "no_meetings": "Es läuft kein Meeting.",
    "meeting": "Meeting",
    "participants": "Reservierte Teilnehmende",
    "reserved_until": "Reserviert bis",
    "overtime": "Überzogen seit",
    "status": "Status",
    "reserved": "reserviert",
    "in_overtime": "überzogen",
    "updated": "Stand",
    "refresh": "Aktualisieren",
    "not_found": "Diese Seite gibt es nicht.",
}

TEXTS: Mapping[str, Mapping[str, str]] = {"en": EN, "de": DE}


def language(cookie: str | None, accept_language: str | None) -> str:
    """``de`` or ``en`` (see the module docstring); never raises."""
    if cookie in LANGUAGES:
        return str(cookie)
    best, best_q = "en", 0.0
    for item in (accept_language or "")[:1000].split(",")[:20]:
        tag, _, params = item.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        q = _quality(params)
        if primary in LANGUAGES and q > best_q:  # q=0: "not acceptable"; ties: the first
            best, best_q = primary, q
    return best


def _quality(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip() == "q":
            try:
                q = float(value)
            except ValueError:
                return 0.0
            return q if 0.0 <= q <= 1.0 else 0.0
    return 1.0
