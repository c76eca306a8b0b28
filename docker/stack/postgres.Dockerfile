# The stack's PostgreSQL: Debian's postgresql package on a root filesystem made by mmdebstrap
# (scripts/build-stack-images.sh), so no registry is needed. Runs as the postgres user.
ARG ROOTFS=toolserver-stack-postgres-rootfs:bookworm
FROM ${ROOTFS}
COPY postgres-entrypoint.sh /usr/local/bin/toolserver-postgres
RUN chmod 755 /usr/local/bin/toolserver-postgres \
    && mkdir -p /var/lib/postgresql/data && chown -R postgres:postgres /var/lib/postgresql
USER postgres
VOLUME /var/lib/postgresql/data
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/toolserver-postgres"]
