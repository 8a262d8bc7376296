# PgBouncer from Debian for the optional `pgbouncer` profile of docker-compose.yml: transaction pooling
# in front of the compose primary, configured as the README's PgBouncer recipe says.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends pgbouncer \
    && rm -rf /var/lib/apt/lists/* \
    && (id postgres >/dev/null 2>&1 || useradd --system --user-group postgres)
COPY pgbouncer.ini /etc/pgbouncer/pgbouncer.ini
COPY pgbouncer-userlist.txt /etc/pgbouncer/userlist.txt
USER postgres
EXPOSE 6432
CMD ["pgbouncer", "/etc/pgbouncer/pgbouncer.ini"]
