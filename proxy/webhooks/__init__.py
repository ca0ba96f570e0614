"""Per-meeting webhooks (issue 9): bbb-webhooks' API and delivery, per customer and meeting.

The way of an event, module by module::

    backend's bbb-webhooks --POST--> intake.py      checks the backend's checksum, maps the
                                       mapping.py   backend meeting to the customer's one
                                          |
                         delivery.Webhooks.accept   privacy.scrubbed (personal data out),
                                          |         registry.HookRegistry.matching (the
                                          |         customer's hooks of that meeting),
                                          |         queue.QueueState on the "webhook-queue"
                                          |         log: durable before intake answers 200
                                          |
                 delivery.Webhooks.deliver_forever  one worker per hook, in order; the POST
                                          |         as callback.py says (form, checksum,
                                          v         retries); SSRF-checked (backends/outbound)
                                the customer's receiver

Hooks themselves: ``registry.py`` (the ``hooks`` log), answered by ``proxy/calls/hooks.py``
with the rules of ``proxy/bbb/hooks.py``.  On the gateway: ``gw.hooks`` and ``gw.webhooks``
(in memory by default; ``proxy/server.py`` opens both logs under ``state_dir``).
"""
