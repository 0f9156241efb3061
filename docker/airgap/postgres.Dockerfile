# Air-gapped stand-in for the official postgres:15 image: Debian's postgresql-15, with an
# entrypoint that honours the same contract compose.yaml relies on (POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB, PGDATA, /docker-entrypoint-initdb.d, `postgres` on PATH, gosu
# for docker/postgres/replica-entrypoint.sh): postgres/docker-entrypoint.sh.
ARG BASE_IMAGE=runops-airgap/debian:bookworm
FROM ${BASE_IMAGE}
# postgresql-common first, told not to create a cluster: the entrypoint makes the only one.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-common \
 && sed -ri 's/#(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postgresql-15 gosu \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /docker-entrypoint-initdb.d /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
 && chmod 0700 /var/lib/postgresql/data && chmod 3777 /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /var/lib/postgresql/data
ENTRYPOINT ["docker-entrypoint.sh"]
# Fast shutdown, as the official image.
STOPSIGNAL SIGINT
EXPOSE 5432
CMD ["postgres"]
