"""The admin console under ``/admin``: operators and resellers run licences from a browser.

``credentials.py`` (password hashes, TOTP secrets at rest, tokens), ``store.py`` (console users,
sessions, the append-only audit log), ``console.py`` (the rules: roles, quotas, login),
``views.py`` (routes, cookies, CSRF, headers, Jinja2 pages in ``templates/``), ``cli.py``
(``kluis admin create-user``). Nothing here reads a message, a contact or a key: the server has
none to read.
"""
