//! Small statistics the benches share.

/// The middle value (the mean of the two middle ones of an even count) of the values that
/// are numbers (NaN left out); `None` of none.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    let upper = *v.get(v.len() / 2)?;
    if v.len() % 2 == 1 {
        return Some(upper);
    }
    let lower = v.get(v.len() / 2 - 1).copied().unwrap_or(upper);
    Some((lower + upper) / 2.0)
}

/// The lowest and the highest of the values that are numbers; `None` of none.
pub fn range(v: &[f64]) -> Option<(f64, f64)> {
    let mut numbers = v.iter().copied().filter(|x| !x.is_nan());
    let first = numbers.next()?;
    Some(numbers.fold((first, first), |(lo, hi), x| (lo.min(x), hi.max(x))))
}

#[cfg(test)]
mod tests {
    use super::{median, range};

    #[test]
    fn a_range_is_the_lowest_and_highest_number() {
        assert_eq!(range(&[]), None);
        assert_eq!(range(&[f64::NAN]), None);
        assert_eq!(range(&[2.0, f64::NAN, -1.0, 3.0]), Some((-1.0, 3.0)));
    }

    #[test]
    fn odd_counts_take_the_middle_even_counts_the_mean_of_the_two_and_nan_is_left_out() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 1.0, -f64::NAN, 2.0]), Some(1.5));
        assert_eq!(median(vec![f64::NAN]), None);
    }
}
