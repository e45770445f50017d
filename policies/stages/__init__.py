"""The stages of a call chain, one module each, every one built the same way:
`build(parts: StageParts, inner: Handler) -> Handler | None` (`policies.stage`).
`policies.pipeline` puts them together in the plan's order."""
