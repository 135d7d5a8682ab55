"""One metadata route, one small handler. Each gets its collaborators handed in and either
returns a response or raises ``Refused``; ``agent.routes`` does the accounting for all."""
