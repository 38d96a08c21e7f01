// A Prometheus histogram whose buckets are already counted elsewhere (the queues' shared stats
// blocks, the drain barrier). prom-client's Histogram only counts observations itself, so this
// hands the registry the same shape its Histogram does (_bucket with cumulative `le`, _sum,
// _count) and prom-client's registry formats and escapes it.

export interface HistogramSeries {
  labels: Record<string, string>;
  /** [upper bound, cumulative count] in ascending order, without +Inf (that is `count`) */
  buckets: [number, number][];
  count: number;
  sum: number;
}

interface MetricValue {
  metricName: string;
  labels: Record<string, string>;
  value: number;
}

export class SnapshotHistogram {
  readonly type = 'histogram';
  readonly aggregator = 'sum';

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly series: () => HistogramSeries[],
  ) {}

  get(): { name: string; help: string; type: string; values: MetricValue[]; aggregator: string } {
    const values: MetricValue[] = [];
    for (const s of this.series()) {
      for (const [le, n] of s.buckets) values.push({ metricName: `${this.name}_bucket`, labels: { ...s.labels, le: String(le) }, value: n });
      values.push({ metricName: `${this.name}_bucket`, labels: { ...s.labels, le: '+Inf' }, value: s.count });
      values.push({ metricName: `${this.name}_sum`, labels: s.labels, value: s.sum });
      values.push({ metricName: `${this.name}_count`, labels: s.labels, value: s.count });
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }

  /** nothing to reset: the counts live where they are counted */
  reset(): void {}
}
