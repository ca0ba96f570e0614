"""Dial-in by phone on a pool: pool-wide unique voice bridges and the FreeSWITCH router.

- :mod:`proxy.voice.bridges`: what a voice bridge (conference PIN) is and how a free one
  is picked; no I/O.  The ledger's admission (:mod:`proxy.ledger.model`) gives every new
  meeting its bridge in the same synchronous step that reserves it.
- :mod:`proxy.voice.dialplan`: what to answer FreeSWITCH's ``mod_xml_curl`` for one
  dialplan lookup (prompt, bridge, re-prompt, reject, not found), and the XML; no I/O.
- :mod:`proxy.voice.fsapi`: the ``POST /fsapi`` route (basic auth, form body, answer).
"""
