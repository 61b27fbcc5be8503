"""Operations as pure logic, no tracking server needed: the promotion gate (``promotion``) and
fleet rollout planning (``fleet``)."""
