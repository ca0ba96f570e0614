"""The customer administrators' pages under ``/portal/`` (issue 11).

- :mod:`proxy.portal.model`: administrators, invitations, closed sessions (pure), and the
  login throttle;
- :mod:`proxy.portal.sessions`: signed session cookies and CSRF tokens (pure);
- :mod:`proxy.portal.forms`, :mod:`proxy.portal.texts`: what the forms accept, the words
  in English and German (pure);
- :mod:`proxy.portal.service`: the thin service on the ``portal`` log;
- :mod:`proxy.portal.web`: the routes; :func:`install` is called by ``create_app``.
"""

from __future__ import annotations

from proxy.portal.web import install

__all__ = ["install"]
