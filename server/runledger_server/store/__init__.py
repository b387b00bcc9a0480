"""Store interfaces (typing.Protocol) and the entities they return; backends implement them."""
