-- Device enrolment secrets: a login that names a device must present its secret, so a station
-- binding is proven by the tablet, not asserted by whoever logs in. Only a SHA-256 digest of the
-- secret is stored (the secrets are 256-bit random values issued by `gateway device enrol`).
-- Devices enrolled before this migration have no secret and cannot bind a login until they are
-- enrolled again (which issues one).
ALTER TABLE devices ADD COLUMN secret_hash text
    CHECK (secret_hash IS NULL OR secret_hash ~ '^sha256:[0-9a-f]{64}$');
