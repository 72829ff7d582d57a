"""The web cabinet (`GET /cabinet`): the reference browser client of specialists and patients."""
